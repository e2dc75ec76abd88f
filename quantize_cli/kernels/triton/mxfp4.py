"""Triton MXFP4 kernels: the signatures of ``reference.quantize_mxfp4`` / ``reference.dequantize_mxfp4``.

Shared exponent ``e = clamp(floor(log2(amax_b)) - 2, -127, 127)`` read from the fp32 exponent bits;
elements ``e2m1(x * 2**-e)``. ``2**-e`` is built from its bits and is a normal fp32 for every reachable
``e`` (-127..125), and multiplying by an exact power of two rounds exactly as the reference's division
by ``2**e`` does. The code is ``common.e2m1_lookup`` (one shared-memory table row, one comparison),
whose table covers ``|x * 2**-e| < 8``; a tile holding an infinity saturates its quotients first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import E2M1_EMAX, E8M0_BIAS
from .common import (
    E2M1_LIMIT,
    FLT_MAX,
    all_blocks,
    check_2d,
    e2m1_decode,
    e2m1_lookup,
    e2m1_rows,
    interleave,
    out_buffer,
    out_code,
    pack_pairs,
    plan_tiling,
    store_out,
    tile_offsets,
)

Tensor = torch.Tensor


@triton.jit
def _shared_exponent(amax, EMAX: tl.constexpr, BIAS: tl.constexpr):
    """Per-block unbiased exponent e (int32) and 2**-e (fp32)."""
    floor_log2 = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - BIAS  # -127 for 0 / subnormals
    e = tl.minimum(tl.maximum(floor_log2 - EMAX, -BIAS), BIAS)
    return e, ((BIAS - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _encode_store(
    q_ptr, e_ptr, blocks, ok, col0, x, inv, fast, BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr
):  # fmt: skip
    v = x * inv[:, None]
    if not fast:  # an infinite element: saturating at the table's edge changes no code
        v = tl.minimum(tl.maximum(v, -E2M1_LIMIT), E2M1_LIMIT)
    codes = e2m1_lookup(v, e_ptr)
    offs, mask = tile_offsets(blocks, ok, col0 // 2, BLOCK // 2, BP // 2)
    tl.store(q_ptr + offs, pack_pairs(codes, BB, BP), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, e_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, NCHUNK: tl.constexpr,
    EMAX: tl.constexpr, BIAS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * BLOCK // 2)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    if NCHUNK == 1:
        offs, mask = tile_offsets(blocks, ok, 0, BLOCK, BP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        e, inv = _shared_exponent(amax, EMAX, BIAS)
        _encode_store(q_ptr, e_ptr, blocks, ok, 0, x, inv, all_blocks(amax <= FLT_MAX), BLOCK, BB, BP)
    else:
        amax = tl.zeros((BB,), tl.float32)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        e, inv = _shared_exponent(amax, EMAX, BIAS)
        fast = all_blocks(amax <= FLT_MAX)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _encode_store(q_ptr, e_ptr, blocks, ok, c * BP, x, inv, fast, BLOCK, BB, BP)
    tl.store(scale_ptr + pid * BB + blocks, (e + BIAS).to(tl.uint8), mask=ok)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BP
    q_ptr += pid.to(tl.int64) * (BB * BLOCK // 2)
    out_ptr += pid.to(tl.int64) * (BB * BLOCK)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    biased = tl.load(scale_ptr + pid * BB + blocks, mask=ok, other=0).to(tl.int32)
    # 2**(biased - 127) from its bits; biased 0 is the subnormal 2**-127 (fraction bit 22).
    scale = tl.where(biased == 0, 0x400000, biased << 23).to(tl.float32, bitcast=True)
    offs, mask = tile_offsets(blocks, ok, col0 // 2, BLOCK // 2, BP // 2)
    p = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    values = interleave(e2m1_decode(p >> 4), e2m1_decode(p & 15), BB, BP)
    offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
    store_out(out_ptr, offs, mask, values * scale[:, None], OUT)


# ---- host side --------------------------------------------------------------------------------------------


def quantize_mxfp4(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) float -> (packed E2M1 codes uint8 (rows, cols // 2), biased E8M0 exponents uint8
    (rows, cols // block_size)); bit-identical to ``reference.quantize_mxfp4``."""
    check_2d(x, block_size)
    if block_size % 2:
        raise ValueError(f"4-bit codes pack in pairs: block_size {block_size} must be even")
    rows, cols = x.shape
    x = x.contiguous()
    q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, cols // block_size), dtype=torch.uint8, device=x.device)
    t = plan_tiling(x.numel(), block_size)
    if t.n_blocks:
        _quantize_kernel[t.grid](
            x, q, scale, e2m1_rows(x.device), t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, NCHUNK=t.chunks,
            EMAX=E2M1_EMAX, BIAS=E8M0_BIAS, num_warps=t.num_warps,
        )  # fmt: skip
    return q, scale


def dequantize_mxfp4(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """e2m1 value * 2**(scale - 127) cast to ``dtype``, as ``reference.dequantize_mxfp4``."""
    rows, width = qdata.shape
    cols = width * 2
    if block_size <= 0 or cols % block_size:
        raise ValueError(f"block_size {block_size} must divide the {cols} columns")
    out, target = out_buffer((rows, cols), dtype, qdata.device)
    t = plan_tiling(rows * cols, block_size, dequant=True)
    if t.n_blocks:
        _dequantize_kernel[(t.grid[0], t.chunks)](
            qdata.contiguous(), scale.contiguous(), target, t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, OUT=out_code(dtype), num_warps=t.num_warps,
        )  # fmt: skip
    return out
