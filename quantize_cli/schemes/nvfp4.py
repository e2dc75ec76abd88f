"""NVFP4: FP4 E2M1 elements, an FP8 E4M3 scale per 16 elements and an fp32 scale per tensor."""

from __future__ import annotations

from typing import Any

from ..kernels.ops import resolve
from .base import Quantized, QuantState, Scheme, Tensor
from .fp4_methods import method_of, padded_hessian_blocks


def _quantize(x: Tensor, block_size: int, backend: str, options: dict[str, Any]) -> Quantized:
    global_scale = options.get("global_scale")
    if global_scale is None:
        global_scale = resolve("nvfp4_global_scale", backend, x.device)(x)
    if method_of(options) == "naive":
        qdata, scale = resolve("quantize_nvfp4", backend, x.device)(x, block_size, global_scale)
    else:
        hessian = padded_hessian_blocks(options, x, block_size)
        qdata, scale = resolve("search_nvfp4", backend, x.device)(x, block_size, global_scale, hessian)
    return Quantized(qdata, scale, global_scale.float().reshape(()))


def _dequantize(state: QuantState, backend: str) -> Tensor:
    fn = resolve("dequantize_nvfp4", backend, state.qdata.device)
    return fn(state.qdata, state.scale, state.global_scale, state.block_size, state.dtype)


NVFP4 = Scheme(
    name="nvfp4",
    bits=4,
    default_block_size=16,
    quantize_fn=_quantize,
    dequantize_fn=_dequantize,
    description="FP4 E2M1, E4M3 scale per 16 + fp32 scale per tensor (NVIDIA)",
    scale_bytes=1.0,
    tensor_bytes=4,
    kernel_ops=("quantize_nvfp4", "dequantize_nvfp4"),
    methods=("naive", "sse", "hessian"),
    options=("global_scale", "method", "hessian"),
)
