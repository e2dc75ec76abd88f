"""MXFP4 (OCP Microscaling): FP4 E2M1 elements, an E8M0 power-of-two scale per 32 elements."""

from __future__ import annotations

from typing import Any

from ..kernels.ops import resolve
from .base import Quantized, QuantState, Scheme, Tensor
from .fp4_methods import method_of, padded_hessian_blocks


def _quantize(x: Tensor, block_size: int, backend: str, options: dict[str, Any]) -> Quantized:
    if method_of(options) == "naive":
        qdata, scale = resolve("quantize_mxfp4", backend, x.device)(x, block_size)
    else:
        hessian = padded_hessian_blocks(options, x, block_size)
        qdata, scale = resolve("search_mxfp4", backend, x.device)(x, block_size, hessian)
    return Quantized(qdata, scale)


def _dequantize(state: QuantState, backend: str) -> Tensor:
    fn = resolve("dequantize_mxfp4", backend, state.qdata.device)
    return fn(state.qdata, state.scale, state.block_size, state.dtype)


MXFP4 = Scheme(
    name="mxfp4",
    bits=4,
    default_block_size=32,
    quantize_fn=_quantize,
    dequantize_fn=_dequantize,
    description="FP4 E2M1, E8M0 (power of two, uint8 biased exponent) scale per 32 (OCP MX)",
    scale_bytes=1.0,
    kernel_ops=("quantize_mxfp4", "dequantize_mxfp4"),
    options=("method", "hessian"),
    methods=("naive", "sse", "hessian"),
)
