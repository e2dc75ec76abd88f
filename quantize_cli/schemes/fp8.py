"""fp8: float8_e4m3fn elements, fp32 scale absmax / 448 per block (or per row)."""

from __future__ import annotations

from typing import Any

from ..kernels.ops import resolve
from .base import Quantized, QuantState, Scheme, Tensor


def _quantize(x: Tensor, block_size: int, backend: str, options: dict[str, Any]) -> Quantized:
    qdata, scale = resolve("quantize_fp8", backend, x.device)(x, block_size)
    return Quantized(qdata, scale)


def _dequantize(state: QuantState, backend: str) -> Tensor:
    fn = resolve("dequantize_fp8", backend, state.qdata.device)
    return fn(state.qdata, state.scale, state.block_size, state.dtype)


FP8 = Scheme(
    name="fp8",
    bits=8,
    default_block_size=128,
    quantize_fn=_quantize,
    dequantize_fn=_dequantize,
    description="float8 E4M3 elements, fp32 scale absmax / 448 per block",
    kernel_ops=("quantize_fp8", "dequantize_fp8"),
)
