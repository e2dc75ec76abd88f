"""quanta: stream Hugging Face checkpoints through quantizers into loadable safetensors folders."""

from .api import bits_per_weight, dequantize, quantize
from .schemes import SCHEMES, QuantState, Scheme, get_scheme

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "QuantState",
    "Scheme",
    "__version__",
    "bits_per_weight",
    "dequantize",
    "get_scheme",
    "quantize",
]
