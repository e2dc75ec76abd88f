"""Absmax-scaled codebook schemes: bitsandbytes' nf4 and fp4, and nf8 (NF4's construction at 8 bits)."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.constants import FP4_CODEBOOK, NF4_CODEBOOK, nf8_codebook
from ..kernels.ops import resolve
from .base import Quantized, QuantState, Scheme, Tensor


def _codebook_scheme(name: str, values: tuple[float, ...], bits: int, description: str) -> Scheme:
    def quantize(x: Tensor, block_size: int, backend: str, options: dict[str, Any]) -> Quantized:
        codebook = torch.tensor(values, dtype=torch.float32, device=x.device)
        qdata, absmax = resolve("quantize_codebook", backend, x.device)(x, block_size, codebook, bits == 4)
        return Quantized(qdata, absmax)

    def dequantize(state: QuantState, backend: str) -> Tensor:
        fn = resolve("dequantize_codebook", backend, state.qdata.device)
        codebook = state.codebook.to(state.qdata.device)
        return fn(state.qdata, state.scale, codebook, state.block_size, bits == 4, state.dtype)

    return Scheme(
        name=name,
        bits=bits,
        default_block_size=64,
        quantize_fn=quantize,
        dequantize_fn=dequantize,
        description=description,
        scale_bytes=4.0,
        kernel_ops=("quantize_codebook", "dequantize_codebook"),
        codebook_values=values,
    )


NF4 = _codebook_scheme("nf4", NF4_CODEBOOK, 4, "NormalFloat4 (bitsandbytes codebook), fp32 absmax per block")
FP4 = _codebook_scheme("fp4", FP4_CODEBOOK, 4, "bitsandbytes FP4 codebook, fp32 absmax per block")
NF8 = _codebook_scheme("nf8", nf8_codebook(), 8, "NormalFloat8: 256 N(0,1) quantiles, fp32 absmax per block")
