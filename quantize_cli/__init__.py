"""quanta: stream Hugging Face checkpoints through quantizers into loadable safetensors folders."""

from .api import bits_per_weight, dequantize, quantize
from .calibration import calibrate
from .nn import Linear4bit, Linear8bitLt, QuantLinear
from .pipeline import convert, inspect_folder
from .reload import load_quantized
from .schemes import SCHEMES, QuantState, Scheme, get_scheme

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "Linear4bit",
    "Linear8bitLt",
    "QuantLinear",
    "QuantState",
    "Scheme",
    "__version__",
    "bits_per_weight",
    "calibrate",
    "convert",
    "dequantize",
    "get_scheme",
    "inspect_folder",
    "load_quantized",
    "quantize",
]
