"""Triton fp8 (E4M3) kernels: the signatures of ``reference.quantize_fp8`` and ``reference.dequantize_fp8``.

Per block ``s = absmax / 448``; ``q = e4m3(clamp(x / s, -448, 448))`` rounded to nearest even
(``common.e4m3_round``: the GPU's conversion, or the fp32 bits under the interpreter), written into the
float8_e4m3fn tensor through a uint8 view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import F8_E4M3_MAX
from .common import (
    check_2d,
    e4m3_decode,
    e4m3_round,
    hw_e4m3,
    out_buffer,
    out_code,
    plan_tiling,
    safe_div,
    store_out,
    tile_offsets,
)

Tensor = torch.Tensor


@triton.jit
def _encode_store(
    q_ptr, blocks, ok, col0, x, scale, BLOCK: tl.constexpr, BP: tl.constexpr, FMAX: tl.constexpr, HW: tl.constexpr
):  # fmt: skip
    v = tl.minimum(tl.maximum(safe_div(x, scale[:, None]), -FMAX), FMAX)
    offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
    tl.store(q_ptr + offs, e4m3_round(v, HW), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, NCHUNK: tl.constexpr, FMAX: tl.constexpr,
    HW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * BLOCK)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    if NCHUNK == 1:
        offs, mask = tile_offsets(blocks, ok, 0, BLOCK, BP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((BB,), FMAX, tl.float32))
        _encode_store(q_ptr, blocks, ok, 0, x, scale, BLOCK, BP, FMAX, HW)
    else:
        absmax = tl.zeros((BB,), tl.float32)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        scale = tl.math.div_rn(absmax, tl.full((BB,), FMAX, tl.float32))
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _encode_store(q_ptr, blocks, ok, c * BP, x, scale, BLOCK, BP, FMAX, HW)
    tl.store(scale_ptr + pid * BB + blocks, scale, mask=ok)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BP
    q_ptr += pid.to(tl.int64) * (BB * BLOCK)
    out_ptr += pid.to(tl.int64) * (BB * BLOCK)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    scale = tl.load(scale_ptr + pid * BB + blocks, mask=ok, other=0.0).to(tl.float32)
    offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
    code = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    store_out(out_ptr, offs, mask, e4m3_decode(code) * scale[:, None], OUT)


# ---- host side --------------------------------------------------------------------------------------------


def quantize_fp8(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) float -> (float8_e4m3fn (rows, cols), scale fp32 (rows, cols // block_size));
    bit-identical to ``reference.quantize_fp8``."""
    check_2d(x, block_size)
    rows, cols = x.shape
    x = x.contiguous()
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, cols // block_size), dtype=torch.float32, device=x.device)
    t = plan_tiling(x.numel(), block_size)
    if t.n_blocks:
        _quantize_kernel[t.grid](
            x, q.view(torch.uint8), scale, t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, NCHUNK=t.chunks, FMAX=F8_E4M3_MAX,
            HW=hw_e4m3(x.device), num_warps=t.num_warps,
        )  # fmt: skip
    return q, scale


def dequantize_fp8(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """e4m3 value * s cast to ``dtype``, as ``reference.dequantize_fp8``; returns (rows, cols)."""
    check_2d(qdata, block_size)
    rows, cols = qdata.shape
    out, target = out_buffer((rows, cols), dtype, qdata.device)
    t = plan_tiling(rows * cols, block_size, dequant=True)
    if t.n_blocks:
        _dequantize_kernel[(t.grid[0], t.chunks)](
            qdata.contiguous().view(torch.uint8), scale.contiguous(), target, t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, OUT=out_code(dtype), num_warps=t.num_warps,
        )  # fmt: skip
    return out
