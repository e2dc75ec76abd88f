"""Quantization schemes: data plus quantize/dequantize functions, registered once in ``SCHEMES``."""

from .base import Quantized, QuantState, Scheme
from .registry import ALIASES, SCHEMES, UnknownSchemeError, get_scheme, scheme_names

__all__ = [
    "ALIASES",
    "SCHEMES",
    "QuantState",
    "Quantized",
    "Scheme",
    "UnknownSchemeError",
    "get_scheme",
    "scheme_names",
]
