"""Triton linear integer kernels (int8, int4 symmetric and asymmetric): the signatures of
``reference.quantize_int`` and ``reference.dequantize_int``.

Per block: symmetric ``s = absmax / qmax``, ``q = clamp(rint(x / s), -qmax, qmax)``; asymmetric (4-bit)
``s = (hi - lo) / 15`` over [min(x, 0), max(x, 0)], ``zp = clamp(rint(-lo / s), 0, 15)``,
``q = clamp(rint(x / s) + zp, 0, 15)``. Every division rounds as the reference's IEEE one: per block
``div_rn``; per element ``common.div_by`` (the block's reciprocal and two exact corrections) wherever
every scale of the tile lies in its range, ``div_rn`` otherwise. The quotient is rounded and clamped
as ``x / s + 1.5 * 2**23`` (the add rounds half to even), whose low bits are the integer: no
float-to-int conversion per element.
"""

from __future__ import annotations

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
    """Quotients x / s -> int32 whose low 8 bits are the code (int8 value, or 4-bit nibble with nothing
    in bits 4-7): the clamped integer plus MAGIC (4-bit symmetric: MAGIC + 8) as fp32 bits.

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
        t = tl.minimum((r + MAGIC) + zp[:, None], MAGIC + 15.0)
        if not NORMAL_SCALE:
            t = tl.maximum(t, MAGIC)
    return t.to(tl.int32, bitcast=True)


@triton.jit
def _encode(x, scale, inv, zp, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """fp32 tile, per-block scale, its reciprocal and zero point (BB,) -> int32 codes (``_round``)."""
    if all_blocks(div_by_fits(scale)):
        code = _round(div_by(x, scale[:, None], inv[:, None]), zp, BITS, SYMMETRIC, True)
    else:
        code = _round(safe_div(x, scale[:, None]), zp, BITS, SYMMETRIC, False)
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
        _store_codes(q_ptr, blocks, ok, 0, _encode(x, scale, inv, zp, BITS, SYMMETRIC), BLOCK, BB, BP, BITS)
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
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            code = _encode(x, scale, inv, zp, BITS, SYMMETRIC)
            _store_codes(q_ptr, blocks, ok, c * BP, code, BLOCK, BB, BP, BITS)
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
    if t.n_blocks:
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
