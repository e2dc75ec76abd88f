"""Triton NVFP4 kernels: the signatures of ``reference.quantize_nvfp4`` / ``reference.dequantize_nvfp4``,
plus ``nvfp4_global_scale`` (the per-tensor amax pass the scheme runs first).

Block scale ``s = e4m3(min((amax_b / 6) / gs, 448))``; element code ``e2m1(x / (s * gs))``, 0 where
the block scale is 0. The global scale ``gs`` is read from its 0-d tensor, so no host sync.

Per element, where every block of the tile allows it (a divisor in ``div_by``'s range, quotients within
the E2M1 table's): the quotient by ``common.div_by`` (the block's reciprocal and two exact corrections,
no division). Elsewhere (blocks whose scale saturated under a user's global scale, extreme magnitudes)
IEEE ``div_rn``, saturated at the table's edge. The code is then ``common.e2m1_lookup`` (one
shared-memory table row, one comparison). Both give the reference's codes. Blocks of up to 32
elements (NVFP4's 16) take a (chunk, block, vector) tile that keeps each block in one thread.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import F4_E2M1_MAX, F8_E4M3_MAX
from .common import (
    E2M1_LIMIT,
    all_blocks,
    check_2d,
    div_by,
    div_by_fits,
    e2m1_decode,
    e2m1_lookup,
    e2m1_rows,
    e4m3_decode,
    e4m3_round,
    hw_e4m3,
    interleave,
    out_buffer,
    out_code,
    pack_pairs,
    plan_tiling,
    reciprocal,
    safe_div,
    store_out,
    tile_offsets,
)

Tensor = torch.Tensor


@triton.jit
def _block_scale(amax, gs, FMAX: tl.constexpr, EMAX: tl.constexpr, HW: tl.constexpr):
    """Per-block (E4M3 code, decode scale code * gs, its reciprocal) from the block amax, in the
    reference's order, and whether the tile may take the fast path (0-d). HW: the E4M3 round trip by
    the GPU's conversions (``common.hw_e4m3``)."""
    block = tl.math.div_rn(tl.math.div_rn(amax, tl.full(amax.shape, EMAX, tl.float32)), tl.zeros_like(amax) + gs)
    code = e4m3_round(tl.minimum(block, FMAX), HW).to(tl.int32)
    if HW:
        total = code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32) * gs
    else:
        total = e4m3_decode(code) * gs
    inv = reciprocal(total)
    # |x / total| <= amax * inv within an ulp or two, so LIMIT bounds every quotient (false for NaN)
    fast = all_blocks(div_by_fits(total) & (amax * inv <= E2M1_LIMIT))
    return code, total, inv, fast


@triton.jit
def _codes(x, total, inv, fast, e_ptr):
    """E2M1 codes (low 8 bits) of a tile x over its per-block ``total`` (broadcast to x's shape)."""
    if fast:
        v = div_by(x, total, inv)
    else:  # saturating at the table's edge changes no code (E2M1 saturates at 6)
        v = tl.minimum(tl.maximum(safe_div(x, total), -E2M1_LIMIT), E2M1_LIMIT)
    return e2m1_lookup(v, e_ptr)


@triton.jit
def _encode_store(
    q_ptr, e_ptr, blocks, ok, col0, x, total, inv, fast, BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr
):  # fmt: skip
    codes = _codes(x, total[:, None], inv[:, None], fast, e_ptr)
    offs, mask = tile_offsets(blocks, ok, col0 // 2, BLOCK // 2, BP // 2)
    tl.store(q_ptr + offs, pack_pairs(codes, BB, BP), mask=mask)


@triton.jit
def _store_narrow(q_ptr, r, okr, codes, BLOCK: tl.constexpr, BB: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr):
    """Store the (NCH, BB, W) codes of ``_quantize_narrow_kernel``, packed in pairs, in its chunk-major rows."""
    hi, lo = tl.split(tl.reshape(codes, (NCH, BB, W // 2, 2)))
    jq = (r // BB)[:, None] * (W // 2) + tl.arange(0, W // 2)[None, :]  # chunk-major rows, as loaded
    packed = tl.reshape(((hi << 4) | lo).to(tl.uint8), (NCH * BB, W // 2))
    tl.store(q_ptr + ((r % BB)[:, None] * (BLOCK // 2) + jq), packed, mask=okr[:, None] & (jq < BLOCK // 2))


@triton.jit
def _quantize_narrow_kernel(
    x_ptr, q_ptr, scale_ptr, gs_ptr, e_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr,
    FMAX: tl.constexpr, EMAX: tl.constexpr, HW: tl.constexpr,
):  # fmt: skip
    """Blocks of at most NCH * W elements as a (NCH, BB, W) tile: block b's NCH chunks of W contiguous
    elements (one 16-byte load each) sit in one thread, so the per-block work (three IEEE divisions, the
    E4M3 round trip) runs once per block instead of in every thread that holds part of it.

    Programs run from the last tile to the first: the amax pass reads the weight forward, so its last
    tiles may still be in L2 (an H100 keeps a few MB of it: 1.5-2 µs of 80-130, results.md)."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * BLOCK // 2)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    # chunk-major rows c * BB + b (BB a multiple of the thread count): a thread's rows are whole blocks. A
    # (NCH, BB, W) load spreads a block's chunks over lanes (they are adjacent in memory), so the per-block
    # work ran in each of them and the codes went through shared memory to be stored.
    r = tl.arange(0, NCH * BB)
    jr = (r // BB)[:, None] * W + tl.arange(0, W)[None, :]  # column within the block
    okr = (r % BB) < n_blocks - pid * BB
    x = tl.load(x_ptr + ((r % BB)[:, None] * BLOCK + jr), mask=okr[:, None] & (jr < BLOCK), other=0.0)
    x = tl.reshape(x, (NCH, BB, W)).to(tl.float32)
    code, total, inv, fast = _block_scale(tl.max(tl.max(tl.abs(x), axis=2), axis=0), tl.load(gs_ptr), FMAX, EMAX, HW)
    total, inv = total[None, :, None], inv[None, :, None]
    # the fast codes are stored outside any branch (in a block outside ``fast``'s range they are wrong, but the
    # lookup stays masked into its table) and the rare tile that needs it is redone over them: on an H100 6-9 %
    # faster for 16-bit inputs (fp32 equal) than choosing the path before encoding, the branch between the loads
    # and the stores
    _store_narrow(q_ptr, r, okr, e2m1_lookup(div_by(x, total, inv), e_ptr), BLOCK, BB, NCH, W)
    if not fast:  # rare (a saturated block scale, extreme magnitudes): the whole tile again, by IEEE division
        _store_narrow(q_ptr, r, okr, _codes(x, total, inv, False, e_ptr), BLOCK, BB, NCH, W)
    tl.store(scale_ptr + pid * BB + blocks, code.to(tl.uint8), mask=ok)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, gs_ptr, e_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, NCHUNK: tl.constexpr,
    FMAX: tl.constexpr, EMAX: tl.constexpr, HW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * BLOCK // 2)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    gs = tl.load(gs_ptr)
    if NCHUNK == 1:
        offs, mask = tile_offsets(blocks, ok, 0, BLOCK, BP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        code, total, inv, fast = _block_scale(tl.max(tl.abs(x), axis=1), gs, FMAX, EMAX, HW)
        _encode_store(q_ptr, e_ptr, blocks, ok, 0, x, total, inv, fast, BLOCK, BB, BP)
    else:
        amax = tl.zeros((BB,), tl.float32)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        code, total, inv, fast = _block_scale(amax, gs, FMAX, EMAX, HW)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            _encode_store(q_ptr, e_ptr, blocks, ok, c * BP, x, total, inv, fast, BLOCK, BB, BP)
    tl.store(scale_ptr + pid * BB + blocks, code.to(tl.uint8), mask=ok)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, gs_ptr, out_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BP
    q_ptr += pid.to(tl.int64) * (BB * BLOCK // 2)
    out_ptr += pid.to(tl.int64) * (BB * BLOCK)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    code = tl.load(scale_ptr + pid * BB + blocks, mask=ok, other=0).to(tl.int32)
    total = e4m3_decode(code) * tl.load(gs_ptr)
    offs, mask = tile_offsets(blocks, ok, col0 // 2, BLOCK // 2, BP // 2)
    p = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    values = interleave(e2m1_decode(p >> 4), e2m1_decode(p & 15), BB, BP)
    offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
    store_out(out_ptr, offs, mask, values * total[:, None], OUT)


@triton.jit
def _absmax_partial_kernel(x_ptr, partial_ptr, n, TILE: tl.constexpr, ITERS: tl.constexpr):
    """partial[pid] = max |x| over ITERS consecutive tiles (no atomics: a second pass reduces them); the
    loads unrolled, so all of a program's are in flight at once."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (TILE * ITERS)
    acc = tl.zeros((TILE,), tl.float32)
    for i in tl.static_range(ITERS):
        offs = base + i * TILE + tl.arange(0, TILE)
        acc = tl.maximum(acc, tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)))
    tl.store(partial_ptr + pid, tl.max(acc, axis=0))


@triton.jit
def _global_scale_kernel(partial_ptr, gs_ptr, n, WIDTH: tl.constexpr, DEN: tl.constexpr):
    """gs = max(partials) / (448 * 6), 1 where that is 0 (``reference.nvfp4_global_scale``)."""
    acc = tl.zeros((WIDTH,), tl.float32)
    for start in range(0, n, WIDTH):
        offs = start + tl.arange(0, WIDTH)
        acc = tl.maximum(acc, tl.load(partial_ptr + offs, mask=offs < n, other=0.0))
    gs = tl.math.div_rn(tl.max(acc, axis=0), DEN)
    tl.store(gs_ptr, tl.where(gs == 0.0, 1.0, gs))


# ---- host side --------------------------------------------------------------------------------------------

# amax pass: (elements per load, loads per program) by input element size; on an H100 0.7-2 µs (1-6 %) faster
# than 4,096 x 8 in a loop for every shape and dtype measured (results.md)
_GS_PLAN = {2: (4096, 8), 4: (8192, 4)}
NARROW_TILE, NARROW_WARPS = 2048, 2  # elements and warps per program of the narrow kernel (H100: results.md)
NARROW = 32  # blocks up to this (padded) width take the (chunk, block, vector) tile: NVFP4's 16 does


def nvfp4_global_scale(x: Tensor) -> Tensor:
    """Per-tensor decode scale ``amax / (448 * 6)`` as a 0-d fp32 tensor (1 for an all-zero tensor), in
    two launches and no host sync; equal to ``reference.nvfp4_global_scale``."""
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    tile, iters = _GS_PLAN.get(x.element_size(), _GS_PLAN[2])
    programs = max(1, triton.cdiv(n, tile * iters))
    partial = torch.empty(programs, dtype=torch.float32, device=x.device)
    gs = torch.empty((), dtype=torch.float32, device=x.device)
    _absmax_partial_kernel[(programs,)](flat, partial, n, TILE=tile, ITERS=iters, num_warps=8)
    _global_scale_kernel[(1,)](partial, gs, programs, WIDTH=1024, DEN=F8_E4M3_MAX * F4_E2M1_MAX, num_warps=4)
    return gs


def quantize_nvfp4(x: Tensor, block_size: int, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) float -> (packed E2M1 codes uint8 (rows, cols // 2), block scales float8_e4m3fn
    (rows, cols // block_size)); bit-identical to ``reference.quantize_nvfp4``."""
    check_2d(x, block_size)
    if block_size % 2:
        raise ValueError(f"4-bit codes pack in pairs: block_size {block_size} must be even")
    rows, cols = x.shape
    x = x.contiguous()
    gs = global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
    q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, cols // block_size), dtype=torch.float8_e4m3fn, device=x.device)
    t = plan_tiling(x.numel(), block_size)
    width = triton.next_power_of_2(block_size)
    if t.n_blocks and width <= NARROW:
        w = min(width, 16 // x.element_size())
        bb = NARROW_TILE // width
        _quantize_narrow_kernel[(triton.cdiv(t.n_blocks, bb),)](
            x, q, scale.view(torch.uint8), gs, e2m1_rows(x.device), t.n_blocks,
            BLOCK=block_size, BB=bb, NCH=width // w, W=w, FMAX=F8_E4M3_MAX, EMAX=F4_E2M1_MAX, HW=hw_e4m3(x.device),
            num_warps=NARROW_WARPS,
        )  # fmt: skip
    elif t.n_blocks:
        _quantize_kernel[t.grid](
            x, q, scale.view(torch.uint8), gs, e2m1_rows(x.device), t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, NCHUNK=t.chunks,
            FMAX=F8_E4M3_MAX, EMAX=F4_E2M1_MAX, HW=hw_e4m3(x.device), num_warps=t.num_warps,
        )  # fmt: skip
    return q, scale


def dequantize_nvfp4(qdata: Tensor, scale: Tensor, global_scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """e2m1 value * (e4m3 scale * gs) cast to ``dtype``, as ``reference.dequantize_nvfp4``."""
    rows, width = qdata.shape
    cols = width * 2
    if block_size <= 0 or cols % block_size:
        raise ValueError(f"block_size {block_size} must divide the {cols} columns")
    out, target = out_buffer((rows, cols), dtype, qdata.device)
    gs = global_scale.to(device=qdata.device, dtype=torch.float32).reshape(1)
    t = plan_tiling(rows * cols, block_size, dequant=True)
    if t.n_blocks:
        _dequantize_kernel[(t.grid[0], t.chunks)](
            qdata.contiguous(), scale.contiguous().view(torch.uint8), gs, target, t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, OUT=out_code(dtype), num_warps=t.num_warps,
        )  # fmt: skip
    return out
