"""Pieces every Triton kernel shares: tiling, tile addressing, exact rounding and the E4M3/E2M1/bf16 bit codecs.

Every kernel views its (rows, cols) input as ``n_blocks = rows * cols / block_size`` contiguous blocks
and gives each program a tile of ``BB`` blocks x ``BP`` columns (``BP`` = the block rounded up to a
power of two). A block wider than ``MAX_WIDTH`` is walked in chunks of ``MAX_WIDTH`` columns instead:
one pass for its statistics, a second to encode (dequantize kernels take one chunk per program).

The arithmetic is written with plain ``tl`` operations, so that it runs the same in Triton's CPU
interpreter (which lacks most libdevice functions and does not round fp32 -> bf16 to nearest even)
and on the GPU: true IEEE division through ``tl.math.div_rn`` (``/`` may lower to an approximate
division), round-half-to-even through the 1.5 * 2**23 trick, and float8/bf16 conversions from the
fp32 bits. One exception: fp8 elements take the GPU's own E4M3 conversion where there is one
(``e4m3_round``), which rounds as torch does; the interpreter's does not, so it keeps the bit codec.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..constants import E2M1_BOUNDS
from ..ops import triton_interpreted

MAX_WIDTH = 8192  # widest tile row; longer blocks (e.g. one scale per row of 11008) go in chunks
TILE = 4096  # elements per program (quantize) for blocks narrower than that
DEQUANT_TILE = 4096  # elements per program (dequantize)
NUM_WARPS: int | None = None  # None: 4, or 8 for tiles of 8192 elements and more (benchmarks may override)

# Output dtype codes for the dequantize kernels (constexpr OUT).
OUT_FP32, OUT_FP16, OUT_BF16 = 0, 1, 2
_OUT_CODES = {torch.float32: OUT_FP32, torch.float16: OUT_FP16, torch.bfloat16: OUT_BF16}


def _below(b: float) -> float:
    """The largest fp32 value below ``b``: ``m >= b`` is ``m > _below(b)`` for fp32 ``m``."""
    return float(np.nextafter(np.float32(b), np.float32(0.0)))


# E2M1 thresholds as strict ">" comparisons: a magnitude on an odd-index bound rounds up (ties to the
# even mantissa above), so that bound moves one fp32 step down (see constants.E2M1_BOUNDS).
_T = [_below(b) if i % 2 else float(b) for i, b in enumerate(E2M1_BOUNDS)]
E2M1_T0, E2M1_T1, E2M1_T2, E2M1_T3 = (tl.constexpr(t) for t in _T[:4])
E2M1_T4, E2M1_T5, E2M1_T6 = (tl.constexpr(t) for t in _T[4:])


@dataclass(frozen=True)
class Tiling:
    """How a kernel walks ``n_blocks`` blocks of ``block_size`` elements."""

    blocks_per_program: int  # BB (power of two)
    width: int  # BP: tile columns, the block (or one chunk of it) rounded up to a power of two
    chunks: int  # NCHUNK: 1, or the number of BP-wide chunks a long block is walked in
    num_warps: int
    n_blocks: int

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.n_blocks, self.blocks_per_program),)


def plan_tiling(n_elements: int, block_size: int, dequant: bool = False) -> Tiling:
    """The tiling for ``n_elements`` (a multiple of ``block_size``) in blocks of ``block_size``."""
    tile = DEQUANT_TILE if dequant else TILE
    width = triton.next_power_of_2(block_size)
    chunks = 1
    if width > MAX_WIDTH:
        width, chunks = MAX_WIDTH, triton.cdiv(block_size, MAX_WIDTH)
    per_program = max(1, tile // width)
    num_warps = NUM_WARPS or (8 if per_program * width >= 8192 else 4)
    return Tiling(per_program, width, chunks, num_warps, n_elements // block_size)


def out_code(dtype: torch.dtype) -> int:
    """The constexpr OUT code of a dequantize output dtype (fp32, fp16 or bf16)."""
    if dtype not in _OUT_CODES:
        raise ValueError(f"Triton kernels write float32, float16 or bfloat16, not {dtype}")
    return _OUT_CODES[dtype]


def out_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(result, what the kernel writes): bf16 is written as its int16 bits (rounded in-kernel)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out, (out.view(torch.int16) if dtype == torch.bfloat16 else out)


def check_2d(x: torch.Tensor, block_size: int) -> None:
    """The kernels' input contract: 2-D, a positive block size that divides the columns."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(x.shape)}")
    if block_size <= 0 or x.shape[1] % block_size:
        raise ValueError(f"block_size {block_size} must divide the {x.shape[1]} columns")


# ---- tile addressing ------------------------------------------------------------------------------------


@triton.jit
def tile_offsets(blocks, blocks_ok, col0, ROW: tl.constexpr, BP: tl.constexpr):
    """Offsets and mask of the (BB, BP) tile of ``ROW``-element rows (``ROW`` = one block's elements
    in this array) starting at column ``col0``. The column mask is only built where BP does not divide
    the row, so full tiles keep a mask that is constant along columns and load as wide vectors."""
    cols = col0 + tl.arange(0, BP)
    offs = blocks[:, None] * ROW + cols[None, :]
    if ROW % BP == 0:
        mask = tl.broadcast_to(blocks_ok[:, None], offs.shape)
    else:
        mask = blocks_ok[:, None] & (cols[None, :] < ROW)
    return offs, mask


@triton.jit
def pack_pairs(codes, BB: tl.constexpr, BP: tl.constexpr):
    """(BB, BP) 4-bit codes -> (BB, BP // 2) bytes, the first of each pair in the high nibble."""
    hi, lo = tl.split(tl.reshape(codes, (BB, BP // 2, 2)))
    return ((hi << 4) | lo).to(tl.uint8)


@triton.jit
def interleave(hi, lo, BB: tl.constexpr, BP: tl.constexpr):
    """Two (BB, BP // 2) tensors -> (BB, BP) with hi[j] at column 2j and lo[j] at 2j + 1."""
    return tl.reshape(tl.join(hi, lo), (BB, BP))


# ---- exact arithmetic -------------------------------------------------------------------------------------


@triton.jit
def rint(v):
    """Round to nearest, ties to even (torch.round), for |v| < 2**22: adding 1.5 * 2**23 leaves no
    fraction bits, so the fp32 add itself rounds half to even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def safe_div(num, den):
    """num / den with IEEE rounding; 0 where den is 0 (all-zero blocks)."""
    zero = den == 0.0
    return tl.where(zero, 0.0, tl.math.div_rn(num, tl.where(zero, 1.0, den)))


# Divisors for which ``div_by`` is exact: every residual it forms stays a normal fp32 (or an exact
# subnormal) for quotients down to 2**-12, below every rounding decision the encoders make.
FLT_MAX = tl.constexpr(float(np.finfo(np.float32).max))
DIV_MIN = tl.constexpr(2.0**-80)
DIV_MAX = tl.constexpr(2.0**80)


@triton.jit
def reciprocal(den):
    """Per-block 1 / den rounded to nearest (IEEE), 0 where den is 0: the multiplier of ``div_by``."""
    zero = den == 0.0
    return tl.where(zero, 0.0, tl.math.div_rn(tl.full(den.shape, 1.0, tl.float32), tl.where(zero, 1.0, den)))


@triton.jit
def div_by_fits(den):
    """Per block: den is 0 or within [DIV_MIN, DIV_MAX], where ``div_by`` may replace ``safe_div``."""
    return (den == 0.0) | ((den >= DIV_MIN) & (den <= DIV_MAX))


@triton.jit
def all_blocks(cond):
    """True (0-d) when ``cond`` (BB,) holds for every block of the tile: the test of a tile-wide branch."""
    return tl.min(cond.to(tl.int32), axis=0) == 1


@triton.jit
def div_by(num, den, inv):
    """num / den rounded to nearest even, from ``inv = reciprocal(den)``: one multiply and four FMAs, no
    division per element. ``num * inv`` is within 1.5 ulp of the quotient; a Markstein correction
    ``q + (num - den * q) * inv`` makes it faithful, and a second one (its residual exact, q being
    faithful), with the correctly rounded ``inv``, correctly rounded (Markstein's theorem; the same two
    steps as the fast path of CUDA's ``div.rn.f32``). Needs den in [DIV_MIN, DIV_MAX]
    (``div_by_fits``); den == 0 (inv 0) gives +-0, where ``safe_div`` gives +0."""
    q = num * inv
    q = tl.fma(tl.fma(-q, den, num), inv, q)
    return tl.fma(tl.fma(-q, den, num), inv, q)


@triton.jit
def store_out(ptr, offs, mask, v, OUT: tl.constexpr):
    """Store fp32 ``v`` as fp32, fp16 (cvt rounds to nearest even) or bf16 bits rounded to nearest even
    here (the interpreter's bf16 cast truncates)."""
    if OUT == 0:
        tl.store(ptr + offs, v, mask=mask)
    elif OUT == 1:
        tl.store(ptr + offs, v.to(tl.float16), mask=mask)
    else:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr + offs, bits.to(tl.int16), mask=mask)


# ---- float8 E4M3 (fn: no infinities, 448 max) ---------------------------------------------------------


@triton.jit
def e4m3_encode(v):
    """fp32 with |v| <= 448 -> E4M3 bits (int32 0..255), round to nearest even, sign kept (as torch's
    ``.to(torch.float8_e4m3fn)``). Below 2**-6 the code is the subnormal count of 2**-9 steps; above,
    the fp32 mantissa is rounded to 3 bits and the exponent rebiased (the carry may bump the exponent)."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    sub = rint(mag * 512.0).to(tl.uint32)
    nrm = ((mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) >> 20) - 960  # 960 = (127 - 7) << 3
    return (tl.where(mag < 0.015625, sub, nrm) | sign).to(tl.int32)


def hw_e4m3(device: torch.device) -> bool:
    """Whether ``e4m3_round`` may use the hardware conversion: compiled for a CUDA GPU with fp8 units
    (compute capability 8.9+), not Triton's interpreter."""
    return device.type == "cuda" and not triton_interpreted() and _capability(device.index) >= (8, 9)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@triton.jit
def e4m3_round(v, HW: tl.constexpr):
    """fp32 with |v| <= 448 -> E4M3 bits (uint8), round to nearest even: with HW (``hw_e4m3``) one
    ``cvt.rn.satfinite`` per pair of elements, else ``e4m3_encode``. On an H100 this took the fp8
    quantize kernel from 1.03-1.29x to 1.01-1.05x of its memory floor (results.md)."""
    if HW:
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        return e4m3_encode(v).to(tl.uint8)


@triton.jit
def e4m3_decode(code):
    """E4M3 bits (int32 0..255) -> fp32 (0x7F / 0xFF are NaN)."""
    mag = code & 0x7F
    exp = mag >> 3
    man = mag & 7
    sub = man.to(tl.float32) * 0.001953125  # man * 2**-9
    nrm = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    val = tl.where(exp == 0, sub, nrm)
    val = tl.where(mag == 0x7F, float("nan"), val)
    return tl.where((code & 0x80) != 0, -val, val)


# ---- FP4 E2M1 ---------------------------------------------------------------------------------------------


@triton.jit
def e2m1_encode(v):
    """fp32 (already divided by its scale) -> E2M1 code 0..15 (int32), as ``reference.e2m1_encode``:
    nearest value, ties to even, saturating at 6; the sign bit only for a non-zero magnitude. A 3-level
    binary search over the 7 sorted thresholds (3 compares, 4 selects) that carries the candidate
    thresholds of the chosen half forward, so no comparison result stays live across levels."""
    mag = tl.abs(v)
    c = mag > E2M1_T3
    idx = tl.where(c, 4, 0)
    h0 = tl.where(c, E2M1_T4, E2M1_T0)
    h1 = tl.where(c, E2M1_T5, E2M1_T1)
    h2 = tl.where(c, E2M1_T6, E2M1_T2)
    c = mag > h1
    idx += tl.where(c, 2, 0)
    idx += tl.where(mag > tl.where(c, h2, h0), 1, 0)
    return tl.where((v < 0.0) & (idx > 0), idx + 8, idx)


@triton.jit
def e2m1_decode(code):
    """E2M1 code (int32 0..15) -> fp32: magnitudes 0, 0.5 (index 0, 1) and 2**(m // 2 - 1) * (1 + (m % 2) / 2)."""
    m = code & 7
    nrm = ((((m >> 1) + 126) << 23) | ((m & 1) << 22)).to(tl.float32, bitcast=True)
    val = tl.where(m < 2, m.to(tl.float32) * 0.5, nrm)
    return tl.where(code >= 8, -val, val)


# ---- bucket lookup: the count of sorted bounds below v with one comparison ---------------------------------

KEY_MAGIC = 2.0**23  # fp32 ulp 1 in [2**23, 2**24): adding it rounds to an integer; its low 23 bits are 0


@triton.jit
def bucket(v, KEY_SCALE: tl.constexpr, KEY_OFFSET: tl.constexpr, KEY_SHIFT: tl.constexpr, KEY_MASK: tl.constexpr):
    """The lookup-table row of v (int32): round(v' * KEY_SCALE) + offset, read from the bits of the fp32
    sum (KEY_OFFSET = 2**23 + offset, so the add itself rounds to an integer; KEY_SCALE is a power of
    two, so a fused or unfused multiply-add agree). v' is v, or v moved away from 0 by the fp32 whose
    bits are KEY_SHIFT (0: none). Monotone in v; masked into the table, so no v (not even NaN) reads
    outside it."""
    if KEY_SHIFT != 0:
        v = v + ((v.to(tl.uint32, bitcast=True) & 0x80000000) | KEY_SHIFT).to(tl.float32, bitcast=True)
    return (v * KEY_SCALE + KEY_OFFSET).to(tl.int32, bitcast=True) & KEY_MASK


@triton.jit
def gather(table, idx):
    """``table[idx]`` for a 1-D table loaded whole into registers and an index tile of any shape. Triton
    stages the table in shared memory once per call and each element reads its entry there
    (``tl.gather``): a shared-memory gather costs a few bank cycles per warp, where the same gather from
    global memory (L1-cached) costs a wavefront per touched sector and made these lookups L1-bound."""
    return tl.reshape(tl.gather(table, tl.reshape(idx, (idx.numel,)), 0), idx.shape)


@triton.jit
def lookup16(
    v, rows_ptr, KEY_SCALE: tl.constexpr, KEY_OFFSET: tl.constexpr, KEY_SHIFT: tl.constexpr, KEY_MASK: tl.constexpr
):  # fmt: skip
    """Code of v from its 8-byte row (``bucket_rows16``, KEY_MASK + 1 rows): low word the row's bound
    (fp32 bits, +inf if none), high word ``code_le | code_gt << 8``. Only the low 8 bits of the result
    are the code (above them may sit code_gt), which a uint8 store and ``pack_pairs`` both ignore."""
    rows = tl.load(rows_ptr + tl.arange(0, KEY_MASK + 1))
    row = gather(rows, bucket(v, KEY_SCALE, KEY_OFFSET, KEY_SHIFT, KEY_MASK))
    bound = row.to(tl.int32).to(tl.float32, bitcast=True)
    codes = (row >> 32).to(tl.int32)
    return tl.where(v > bound, codes >> 8, codes)


def bucket_keys(v: torch.Tensor, scale: float, offset: float, shift: float) -> torch.Tensor:
    """``bucket`` on the host, unmasked (int64), with the same fp32 operations on CPU values. Rows of
    bounds are taken at ``bounds + 0.0``: a bound -0.0 compares as +0.0, and must sit in +0.0's row."""
    v = v.to(torch.float32)
    if shift:
        v = v + torch.copysign(torch.full_like(v, shift), v)
    s = v * scale + torch.tensor(KEY_MAGIC + offset, dtype=torch.float32)
    return s.view(torch.int32).long() - torch.tensor(KEY_MAGIC, dtype=torch.float32).view(torch.int32).long()


def bucket_rows16(bounds: torch.Tensor, order: torch.Tensor, keys: torch.Tensor, n_rows: int) -> torch.Tensor:
    """int64 rows for ``lookup16``: ``bound_bits | (code_le | code_gt << 8) << 32``.

    ``bounds`` are sorted with distinct ``keys`` (their rows); ``order[i]`` is the code of sorted
    position i (``#(bounds < v)``). A row's code_le is the code at the count of bounds in lower rows,
    all below any v of the row since ``bucket`` is monotone; bounds in higher rows are at or above it.
    """
    rows = torch.arange(n_rows)
    below = torch.searchsorted(keys, rows)
    has = (below < keys.numel()) & (keys[below.clamp(max=keys.numel() - 1)] == rows)
    bound = torch.where(has, bounds.float()[below.clamp(max=keys.numel() - 1)], torch.tensor(float("inf")))
    codes = order.long()[below] | (order.long()[below + has.long()] << 8)
    return (bound.view(torch.int32).long() & 0xFFFFFFFF) | (codes << 32)


# ---- E2M1 by arithmetic -------------------------------------------------------------------------------------


@triton.jit
def e2m1_magic(y):
    """y clamped to 6, and the bits of M = 1.5 * 2**23 * u for E2M1's grid spacing u at y: u = 0.5 below 2,
    1 in [2, 4), 2 in [4, 6], i.e. 2**(e - 1) with e = floor(log2(max(y, 1))); M's bits are the exponent
    of max(y, 1) raised by 22 with fraction 0.5 (0x0B400000 added)."""
    yc = tl.minimum(y, 6.0)
    return yc, (tl.maximum(yc, 1.0).to(tl.int32, bitcast=True) & 0x7F800000) + 0x0B400000


@triton.jit
def e2m1_index(y):
    """The E2M1 index 0..7 of y >= 0 (= e2m1_encode(y)): y + M = M + k u, so the bits of the sum minus
    M's count k, and the index is k + 2 e (u = 2**(e - 1))."""
    yc, mb = e2m1_magic(y)
    k = (yc + mb.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True) - mb
    return k + 2 * ((mb >> 23) - 149)  # 149 = 127 + 22


# ---- E2M1 by bucket lookup ----------------------------------------------------------------------------------

# v > b over the sorted bounds of both signs: positive ones are the strict thresholds above; a negative v
# moves to the smaller magnitude when |v| <= t, i.e. v > the fp32 just below -t. Codes: sign bit only for
# a non-zero magnitude, so the positions around 0 share code 0.
_E2M1_SORTED = [float(np.nextafter(np.float32(-t), np.float32(-np.inf))) for t in reversed(_T)] + _T
_E2M1_ORDER = [15, 14, 13, 12, 11, 10, 9, 0, 1, 2, 3, 4, 5, 6, 7]
E2M1_KEY_SCALE = tl.constexpr(4.0)  # rows a quarter wide: each holds at most one bound
E2M1_LIMIT = tl.constexpr(15.0)  # |v| the table covers (with a margin): the rows span [-16.25, 16.25]
E2M1_KEY_OFFSET = tl.constexpr(KEY_MAGIC + 65.0)
E2M1_KEY_MASK = tl.constexpr(255)
_E2M1_ROWS: dict[torch.device, torch.Tensor] = {}


def e2m1_rows(device: torch.device) -> torch.Tensor:
    """``lookup16`` rows of E2M1 (``e2m1_lookup``) on ``device``, built once per device."""
    if device not in _E2M1_ROWS:
        bounds = torch.tensor(_E2M1_SORTED, dtype=torch.float32)
        keys = bucket_keys(bounds + 0.0, E2M1_KEY_SCALE.value, E2M1_KEY_OFFSET.value - KEY_MAGIC, 0.0)
        assert keys.unique().numel() == keys.numel() and keys.min() > 0 and keys.max() < E2M1_KEY_MASK.value
        order = torch.tensor(_E2M1_ORDER, dtype=torch.uint8)
        _E2M1_ROWS[device] = bucket_rows16(bounds, order, keys, E2M1_KEY_MASK.value + 1).to(device)
    return _E2M1_ROWS[device]


@triton.jit
def e2m1_lookup(v, rows_ptr):
    """``e2m1_encode`` for |v| <= E2M1_LIMIT by one table row and one comparison (low 8 bits of the
    result; see ``lookup16``). Larger |v| would wrap to another row: callers bound it per block."""
    return lookup16(v, rows_ptr, E2M1_KEY_SCALE, E2M1_KEY_OFFSET, 0, E2M1_KEY_MASK)
