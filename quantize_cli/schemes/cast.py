"""fp16 / bf16: a plain cast, kept in the registry so a recipe can name it like any other scheme."""

from __future__ import annotations

from typing import Any

import torch

from .base import Quantized, QuantState, Scheme, Tensor


def _cast_scheme(name: str, dtype: torch.dtype) -> Scheme:
    def quantize(x: Tensor, block_size: int, backend: str, options: dict[str, Any]) -> Quantized:
        return Quantized(x.to(dtype))

    def dequantize(state: QuantState, backend: str) -> Tensor:
        return state.qdata.to(state.dtype)

    return Scheme(
        name=name,
        bits=16,
        default_block_size=None,
        quantize_fn=quantize,
        dequantize_fn=dequantize,
        description=f"cast to {name}",
        scale_bytes=0.0,
    )


FP16 = _cast_scheme("fp16", torch.float16)
BF16 = _cast_scheme("bf16", torch.bfloat16)
