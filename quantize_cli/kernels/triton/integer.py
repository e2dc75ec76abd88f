"""Triton linear integer kernels (int8, int4 symmetric and asymmetric): the signatures of
``reference.quantize_int`` and ``reference.dequantize_int``.

Per block: symmetric ``s = absmax / qmax``, ``q = clamp(rint(x / s), -qmax, qmax)``; asymmetric (4-bit)
``s = (hi - lo) / 15`` over [min(x, 0), max(x, 0)], ``zp = clamp(rint(-lo / s), 0, 15)``,
``q = clamp(rint(x / s) + zp, 0, 15)``. Every division rounds as the reference's IEEE one: per block
``div_rn``; per element ``common.div_by`` (the block's reciprocal and two exact corrections) wherever
every scale of the tile lies in its range, ``div_rn`` otherwise. The quotient is rounded and clamped
as ``x / s + 1.5 * 2**23`` (the add rounds half to even), whose low bits are the integer: no
float-to-int conversion per element.

Blocks within a warp's reach (``plan_groups``: up to 1,024 16-bit elements for 4-bit codes) take the
grouped kernel, where each lane holds whole 16-byte chunks of one block; wider ones (one scale per long
row) a (blocks, columns) tile, walked in chunks past ``common.MAX_WIDTH``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    all_blocks,
    check_2d,
    div_by,
    div_by_fits,
    interleave,
    out_buffer,
    out_code,
    pack_pairs,
    plan_tiling,
    reciprocal,
    rint,
    safe_div,
    store_out,
    tile_offsets,
)

Tensor = torch.Tensor


MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: fp32 ulp 1, low 22 bits 0


@triton.jit
def _round(r, zp, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, NORMAL_SCALE: tl.constexpr):
    """Quotients x / s (zp broadcast to their shape) -> int32 whose low 8 bits are the code (int8 value, or
    4-bit nibble with nothing in bits 4-7): the clamped integer plus MAGIC (4-bit symmetric: MAGIC + 8) as
    fp32 bits.

    With NORMAL_SCALE (every s of the tile a normal fp32, so s = RN(num / den) is within 2**-24 of it)
    clamps that cannot bind are left out: symmetric, |x| / s <= qmax * (1 + 2**-23) rounds to at most
    qmax; asymmetric, x >= lo gives rint(x / s) >= rint(lo / s) = -zp (zp = rint(-lo / s) <= 15 is not
    clamped either), so only the upper clamp stays. A subnormal s is coarser and needs them all."""
    if SYMMETRIC:
        qmax: tl.constexpr = 2 ** (BITS - 1) - 1
        base: tl.constexpr = MAGIC + 8.0 if BITS == 4 else MAGIC  # an even base keeps ties to even
        t = r + base
        if not NORMAL_SCALE:
            t = tl.minimum(tl.maximum(t, base - qmax), base + qmax)
    else:
        t = tl.minimum((r + MAGIC) + zp, MAGIC + 15.0)
        if not NORMAL_SCALE:
            t = tl.maximum(t, MAGIC)
    return t.to(tl.int32, bitcast=True)


@triton.jit
def _encode(x, scale, inv, zp, fast, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """fp32 tile and its per-block scale, reciprocal and zero point (broadcast to the tile's shape) ->
    int32 codes (``_round``); ``fast``: every scale of the tile fits ``div_by`` (``all_blocks``)."""
    if fast:
        code = _round(div_by(x, scale, inv), zp, BITS, SYMMETRIC, True)
    else:
        code = _round(safe_div(x, scale), zp, BITS, SYMMETRIC, False)
    return code


@triton.jit
def _store_codes(
    q_ptr, blocks, ok, col0, code, BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BITS: tl.constexpr
):
    if BITS == 4:
        offs, mask = tile_offsets(blocks, ok, col0 // 2, BLOCK // 2, BP // 2)
        tl.store(q_ptr + offs, pack_pairs(code, BB, BP), mask=mask)
    else:
        offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
        tl.store(q_ptr + offs, code.to(tl.int8), mask=mask)


@triton.jit
def _stats(x, SYMMETRIC: tl.constexpr):
    """Per-block (lo, hi): (-absmax, absmax) when symmetric, else (min(x, 0), max(x, 0)). Padding lanes
    load 0, which both already include."""
    if SYMMETRIC:
        hi = tl.max(tl.abs(x), axis=1)
        lo = -hi
    else:
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
    return lo, hi


@triton.jit
def _scale_zero(lo, hi, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Per-block (scale, its reciprocal, zero point) from the block's statistics."""
    if SYMMETRIC:
        qmax: tl.constexpr = 2 ** (BITS - 1) - 1
        scale = tl.math.div_rn(hi, tl.full(hi.shape, qmax, tl.float32))
        zp = tl.zeros_like(scale)
    else:
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, 15.0, tl.float32))
        zp = tl.minimum(tl.maximum(rint(safe_div(-lo, scale)), 0.0), 15.0)
    return scale, reciprocal(scale), zp


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, scale_ptr, zp_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, NCHUNK: tl.constexpr,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * BLOCK * BITS // 8)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    if NCHUNK == 1:
        offs, mask = tile_offsets(blocks, ok, 0, BLOCK, BP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lo, hi = _stats(x, SYMMETRIC)
        scale, inv, zp = _scale_zero(lo, hi, BITS, SYMMETRIC)
        code = _encode(x, scale[:, None], inv[:, None], zp[:, None], all_blocks(div_by_fits(scale)), BITS, SYMMETRIC)
        _store_codes(q_ptr, blocks, ok, 0, code, BLOCK, BB, BP, BITS)
    else:
        lo = tl.zeros((BB,), tl.float32)
        hi = tl.zeros((BB,), tl.float32)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            c_lo, c_hi = _stats(x, SYMMETRIC)
            lo = tl.minimum(lo, c_lo)
            hi = tl.maximum(hi, c_hi)
        scale, inv, zp = _scale_zero(lo, hi, BITS, SYMMETRIC)
        fast = all_blocks(div_by_fits(scale))
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            code = _encode(x, scale[:, None], inv[:, None], zp[:, None], fast, BITS, SYMMETRIC)
            _store_codes(q_ptr, blocks, ok, c * BP, code, BLOCK, BB, BP, BITS)
    tl.store(scale_ptr + pid * BB + blocks, scale, mask=ok)
    if not SYMMETRIC:
        tl.store(zp_ptr + pid * BB + blocks, zp.to(tl.uint8), mask=ok)


@triton.jit
def _group_stats(x, SYMMETRIC: tl.constexpr):
    """``_stats`` of a (CPT, BB, G, W) tile: per block over its G threads' CPT chunks of W elements."""
    if SYMMETRIC:
        hi = tl.max(tl.max(tl.max(tl.abs(x), axis=3), axis=0), axis=1)
        lo = -hi
    else:
        lo = tl.minimum(tl.min(tl.min(tl.min(x, axis=3), axis=0), axis=1), 0.0)
        hi = tl.maximum(tl.max(tl.max(tl.max(x, axis=3), axis=0), axis=1), 0.0)
    return lo, hi


@triton.jit
def _store_group(
    q_ptr, b, c, okb, code, BLOCK: tl.constexpr, BB: tl.constexpr, G: tl.constexpr, CPT: tl.constexpr,
    W: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """Store the (CPT, BB, G, W) codes of ``_quantize_grouped_kernel`` (4-bit ones packed in pairs)."""
    if BITS == 4:
        hi, lo = tl.split(tl.reshape(code, (CPT, BB, G, W // 2, 2)))
        packed = tl.reshape(((hi << 4) | lo).to(tl.uint8), (CPT * BB * G, W // 2))
        col = c[:, None] * (W // 2) + tl.arange(0, W // 2)[None, :]
        tl.store(q_ptr + (b[:, None] * (BLOCK // 2) + col), packed, mask=okb & (col < BLOCK // 2))
    else:
        col = c[:, None] * W + tl.arange(0, W)[None, :]
        codes = tl.reshape(code, (CPT * BB * G, W)).to(tl.int8)
        tl.store(q_ptr + (b[:, None] * BLOCK + col), codes, mask=okb & (col < BLOCK))


@triton.jit
def _quantize_grouped_kernel(
    x_ptr, q_ptr, scale_ptr, zp_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, G: tl.constexpr, CPT: tl.constexpr, W: tl.constexpr,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    """BB blocks of at most G * CPT * W elements, each held by G adjacent lanes of one warp, each lane CPT
    chunks of W contiguous elements (one 16-byte load each). Rows of the loaded (CPT * BB * G, W) tile are
    ``c_hi * BB * G + b * G + c_lo`` for chunk ``c_hi * G + c_lo`` of block b, so that with BB * G a multiple
    of the thread count a thread holds whole lane shares (CPT chunks) of BB * G / threads blocks: the per-block
    work (two IEEE divisions, three for the zero point) runs once per CPT * W elements instead of once per W
    (a (BB, BP) tile spreads a block over 16 lanes, each of which repeats it), and a block's statistics need
    log2(G) shuffles."""
    pid = tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * BLOCK * BITS // 8)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    r = tl.arange(0, CPT * BB * G)
    b = (r // G) % BB
    c = (r // (BB * G)) * G + r % G
    okb = (b < n_blocks - pid * BB)[:, None]
    col = c[:, None] * W + tl.arange(0, W)[None, :]
    x = tl.load(x_ptr + (b[:, None] * BLOCK + col), mask=okb & (col < BLOCK), other=0.0)
    x = tl.reshape(x, (CPT, BB, G, W)).to(tl.float32)
    lo, hi = _group_stats(x, SYMMETRIC)
    scale, inv, zp = _scale_zero(lo, hi, BITS, SYMMETRIC)
    s4, i4, z4 = scale[None, :, None, None], inv[None, :, None, None], zp[None, :, None, None]
    code = _encode(x, s4, i4, z4, all_blocks(div_by_fits(scale)), BITS, SYMMETRIC)
    _store_group(q_ptr, b, c, okb, code, BLOCK, BB, G, CPT, W, BITS)
    tl.store(scale_ptr + pid * BB + blocks, scale, mask=ok)
    if not SYMMETRIC:
        tl.store(zp_ptr + pid * BB + blocks, zp.to(tl.uint8), mask=ok)


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, zp_ptr, out_ptr, n_blocks,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    OUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BP
    q_ptr += pid.to(tl.int64) * (BB * BLOCK * BITS // 8)
    out_ptr += pid.to(tl.int64) * (BB * BLOCK)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    scale = tl.load(scale_ptr + pid * BB + blocks, mask=ok, other=0.0).to(tl.float32)
    if BITS == 4:
        if HAS_ZERO:
            zero = tl.load(zp_ptr + pid * BB + blocks, mask=ok, other=0).to(tl.float32)
        else:
            zero = tl.full((BB,), 8.0, tl.float32)
        offs, mask = tile_offsets(blocks, ok, col0 // 2, BLOCK // 2, BP // 2)
        p = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        q = interleave((p >> 4).to(tl.float32), (p & 15).to(tl.float32), BB, BP)
        v = (q - zero[:, None]) * scale[:, None]
    else:
        offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
        v = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32) * scale[:, None]
    offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
    store_out(out_ptr, offs, mask, v, OUT)


# ---- host side --------------------------------------------------------------------------------------------

# The grouped kernel's shape by code width, tuned on an H100 (benchmarks/results.md): 16-byte chunks per lane
# (4 for 4-bit codes, 2 for int8) and blocks per lane (2, 1), in programs of GROUP_WARPS warps.
LANE_PLAN = {4: (4, 2), 8: (2, 1)}
GROUP_WARPS = 2


@dataclass(frozen=True)
class Groups:
    """How ``_quantize_grouped_kernel`` covers a block: ``lanes`` x ``chunks_per_lane`` chunks of ``chunk``."""

    chunk: int  # W: elements per 16-byte load
    chunks_per_lane: int  # CPT
    lanes: int  # G: lanes per block (a power of two, at most a warp)
    blocks_per_program: int  # BB
    num_warps: int


def plan_groups(block_size: int, element_size: int, bits: int) -> Groups | None:
    """The grouped tiling of ``block_size`` blocks, or None where a block needs more than a warp."""
    width = triton.next_power_of_2(block_size)
    chunk = min(width, 16 // element_size)
    chunks = width // chunk
    chunks_per_lane, blocks_per_lane = LANE_PLAN[bits]
    per_lane = min(chunks, chunks_per_lane)
    lanes = chunks // per_lane
    if lanes > 32:
        return None
    return Groups(chunk, per_lane, lanes, 32 * GROUP_WARPS * blocks_per_lane // lanes, GROUP_WARPS)


def _check_bits(bits: int, symmetric: bool) -> None:
    if bits not in (4, 8):
        raise ValueError(f"the Triton integer kernels take 4 or 8 bits, not {bits}")
    if not symmetric and bits != 4:
        raise ValueError("asymmetric quantization is defined for 4 bits only")


def quantize_int(x: Tensor, block_size: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(rows, cols) float -> (codes: int8 (rows, cols) or packed uint8 (rows, cols // 2), scale fp32
    (rows, cols // block_size), zero point uint8 or None); bit-identical to ``reference.quantize_int``."""
    check_2d(x, block_size)
    _check_bits(bits, symmetric)
    rows, cols = x.shape
    x = x.contiguous()
    if bits == 4:
        if block_size % 2:
            raise ValueError(f"4-bit codes pack in pairs: block_size {block_size} must be even")
        q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
    else:
        q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows, cols // block_size), dtype=torch.float32, device=x.device)
    zero = None if symmetric else torch.empty(scale.shape, dtype=torch.uint8, device=x.device)
    t = plan_tiling(x.numel(), block_size)
    g = plan_groups(block_size, x.element_size(), bits)
    if t.n_blocks and g is not None:
        _quantize_grouped_kernel[(triton.cdiv(t.n_blocks, g.blocks_per_program),)](
            x, q, scale, scale if zero is None else zero, t.n_blocks,
            BLOCK=block_size, BB=g.blocks_per_program, G=g.lanes, CPT=g.chunks_per_lane, W=g.chunk,
            BITS=bits, SYMMETRIC=symmetric, num_warps=g.num_warps,
        )  # fmt: skip
    elif t.n_blocks:
        _quantize_kernel[t.grid](
            x, q, scale, scale if zero is None else zero, t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, NCHUNK=t.chunks, BITS=bits,
            SYMMETRIC=symmetric, num_warps=t.num_warps,
        )  # fmt: skip
    return q, scale, zero


def dequantize_int(
    qdata: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: int, bits: int, dtype: torch.dtype
) -> Tensor:
    """(q - zero) * s cast to ``dtype``, as ``reference.dequantize_int``; returns (rows, cols)."""
    _check_bits(bits, True)
    rows, width = qdata.shape
    cols = width * 2 if bits == 4 else width
    if block_size <= 0 or cols % block_size:
        raise ValueError(f"block_size {block_size} must divide the {cols} columns")
    out, target = out_buffer((rows, cols), dtype, qdata.device)
    t = plan_tiling(rows * cols, block_size, dequant=True)
    if t.n_blocks:
        scale = scale.contiguous()
        has_zero = bits == 4 and zero_point is not None
        _dequantize_kernel[(t.grid[0], t.chunks)](
            qdata.contiguous(), scale, zero_point.contiguous() if has_zero else scale, target, t.n_blocks,
            BLOCK=block_size, BB=t.blocks_per_program, BP=t.width, BITS=bits, HAS_ZERO=has_zero,
            OUT=out_code(dtype), num_warps=t.num_warps,
        )  # fmt: skip
    return out
