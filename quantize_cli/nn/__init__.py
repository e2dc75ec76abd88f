"""Quantized modules: ``QuantLinear`` (any weight-only scheme) and the drop-ins ``Linear4bit``, ``Linear8bitLt``."""

from .functional import dequantize_linear, fake_quantize_input, fp8_activations, quant_linear, register_quant_linear
from .modules import Linear4bit, Linear8bitLt, QuantLinear

__all__ = [
    "Linear4bit",
    "Linear8bitLt",
    "QuantLinear",
    "dequantize_linear",
    "fake_quantize_input",
    "fp8_activations",
    "quant_linear",
    "register_quant_linear",
]
