"""Triton absmax-codebook kernels (nf4, fp4, nf8): the signatures of ``reference.quantize_codebook`` and
``reference.dequantize_codebook``.

Nearest-value search is ``bucketize`` over the sorted midpoints (``constants.codebook_search_tables``),
a tie going to the lower value: the code is ``order[#(bounds < v)]``. Two ways to count:

- Bucket lookup (nf4, fp4, nf8). The scaled value v picks a row of a small table with one fp32
  multiply-add (``common.bucket``: a uniform grid, the row number read from the bits of the sum). The
  rows are fine enough that each holds at most one bound, so one comparison with that row's bound
  finishes the count: ``code = row.code_le`` or ``row.code_gt`` (16 values, one 8-byte row), or
  ``base + (v > bounds[base])`` (256 values: the row's base count, then the bound). The row number is
  monotone in v, so a bound whose row lies below (above) v's lies below (at or above) v: exact, ties
  included. fp4's bounds crowd around 0 (-0.0026, 0, 0.0026), so its rows are taken at v moved 1/32
  away from 0, which spreads them apart (``KEY_SHIFT``); the comparison still uses v itself. Tables are
  read from shared memory (``common.gather``).
- Binary search, for codebooks the rows cannot separate or whose bounds lie outside [-1, 1]: for 16
  values a 4-level search whose bounds are selected from 15 scalars held in registers (4 compares,
  11 selects); 256 values take those 4 levels over every 16th bound, then 4 levels reading the bounds
  table (1 KB, cache-resident).

Compares and selects issue at half the fp32 rate on Hopper: the search spent ~27 of them per nf4
element and was bound by that pipe; the lookup spends ~10 (benchmarks/results.md has the numbers).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..constants import codebook_search_tables
from .common import (
    KEY_MAGIC,
    bucket,
    bucket_keys,
    bucket_rows16,
    check_2d,
    gather,
    interleave,
    lookup16,
    out_buffer,
    out_code,
    pack_pairs,
    plan_tiling,
    store_out,
    tile_offsets,
)

Tensor = torch.Tensor


@triton.jit
def _search16(v, b_ptr, STRIDE: tl.constexpr, o_ptr, LOOKUP: tl.constexpr):
    """#(bounds < v) over the 15 sorted bounds b[STRIDE * (k + 1) - 1], k = 0..14 (int32 0..15), or with
    LOOKUP the code ``order[#]`` (16 nibbles at ``o_ptr``).

    Binary search that carries the candidate bounds of the chosen half forward (7, then 3, then 1
    selects), so each comparison is consumed at once and no predicate stays live across levels. The
    order lookup carries the half's eight code nibbles (one 32-bit word) and a shift the same way."""
    s0 = tl.load(b_ptr + (1 * STRIDE - 1))
    s1 = tl.load(b_ptr + (2 * STRIDE - 1))
    s2 = tl.load(b_ptr + (3 * STRIDE - 1))
    s3 = tl.load(b_ptr + (4 * STRIDE - 1))
    s4 = tl.load(b_ptr + (5 * STRIDE - 1))
    s5 = tl.load(b_ptr + (6 * STRIDE - 1))
    s6 = tl.load(b_ptr + (7 * STRIDE - 1))
    s7 = tl.load(b_ptr + (8 * STRIDE - 1))
    s8 = tl.load(b_ptr + (9 * STRIDE - 1))
    s9 = tl.load(b_ptr + (10 * STRIDE - 1))
    s10 = tl.load(b_ptr + (11 * STRIDE - 1))
    s11 = tl.load(b_ptr + (12 * STRIDE - 1))
    s12 = tl.load(b_ptr + (13 * STRIDE - 1))
    s13 = tl.load(b_ptr + (14 * STRIDE - 1))
    s14 = tl.load(b_ptr + (15 * STRIDE - 1))
    c = v > s7
    if LOOKUP:
        lo = tl.load(o_ptr).to(tl.int32)
        hi = tl.load(o_ptr + 8).to(tl.int32)
        for j in tl.static_range(1, 8):
            lo = lo | (tl.load(o_ptr + j).to(tl.int32) << (4 * j))
            hi = hi | (tl.load(o_ptr + 8 + j).to(tl.int32) << (4 * j))
        word = tl.where(c, hi, lo)
        idx = tl.zeros_like(word)  # from here on: the nibble's shift, 4 * (position within the half)
        unit: tl.constexpr = 4
    else:
        idx = tl.where(c, 8, 0)
        unit: tl.constexpr = 1
    h0 = tl.where(c, s8, s0)
    h1 = tl.where(c, s9, s1)
    h2 = tl.where(c, s10, s2)
    h3 = tl.where(c, s11, s3)
    h4 = tl.where(c, s12, s4)
    h5 = tl.where(c, s13, s5)
    h6 = tl.where(c, s14, s6)
    c = v > h3
    idx += tl.where(c, 4 * unit, 0)
    q0 = tl.where(c, h4, h0)
    q1 = tl.where(c, h5, h1)
    q2 = tl.where(c, h6, h2)
    c = v > q1
    idx += tl.where(c, 2 * unit, 0)
    idx += tl.where(v > tl.where(c, q2, q0), unit, 0)
    if LOOKUP:
        idx = (word >> idx) & 15
    return idx


@triton.jit
def _lookup256(
    v, k_ptr, b_ptr, o_ptr, IDENTITY: tl.constexpr,
    KEY_SCALE: tl.constexpr, KEY_OFFSET: tl.constexpr, KEY_SHIFT: tl.constexpr, KEY_MASK: tl.constexpr,
):  # fmt: skip
    """#(bounds < v) as the row's base count (uint8, KEY_MASK + 1 rows) plus one comparison with
    ``bounds[base]`` (the first bound at or above the row; +inf past the last), then the code through
    ``order`` unless IDENTITY; every table read is a shared-memory ``gather``."""
    rows = tl.load(k_ptr + tl.arange(0, KEY_MASK + 1))
    idx = gather(rows, bucket(v, KEY_SCALE, KEY_OFFSET, KEY_SHIFT, KEY_MASK)).to(tl.int32)
    idx += tl.where(v > gather(tl.load(b_ptr + tl.arange(0, 256)), idx), 1, 0)
    if not IDENTITY:
        idx = gather(tl.load(o_ptr + tl.arange(0, 256)), idx).to(tl.int32)
    return idx


@triton.jit
def _encode(
    x, inv, k_ptr, b_ptr, o_ptr, LEVELS: tl.constexpr, IDENTITY: tl.constexpr, CLAMP: tl.constexpr,
    KEY_SCALE: tl.constexpr, KEY_OFFSET: tl.constexpr, KEY_SHIFT: tl.constexpr, KEY_MASK: tl.constexpr,
):  # fmt: skip
    """fp32 tile, per-block 1/absmax (BB,) -> int32 codes (low 8 bits). KEY_MASK 0 selects the binary
    search. The reference clamps x / absmax to [-1, 1]; that only changes a search over bounds that lie
    outside [-1, 1] (CLAMP, binary search only), never over midpoints of a codebook within [-1, 1], so it
    is skipped there."""
    v = x * inv[:, None]
    if CLAMP:
        v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    if KEY_MASK != 0:
        if LEVELS == 4:
            code = lookup16(v, k_ptr, KEY_SCALE, KEY_OFFSET, KEY_SHIFT, KEY_MASK)
        else:
            code = _lookup256(v, k_ptr, b_ptr, o_ptr, IDENTITY, KEY_SCALE, KEY_OFFSET, KEY_SHIFT, KEY_MASK)
    elif LEVELS == 4:
        code = _search16(v, b_ptr, 1, o_ptr, not IDENTITY)
    else:
        idx = _search16(v, b_ptr, 16, o_ptr, False) * 16
        for k in tl.static_range(4):  # steps 8, 4, 2, 1 within the 16-wide segment
            idx += tl.where(v > tl.load(b_ptr + idx + ((8 >> k) - 1)), 8 >> k, 0)
        if IDENTITY:
            code = idx
        else:
            code = tl.load(o_ptr + idx).to(tl.int32)
    return code


@triton.jit
def _store_codes(
    q_ptr, blocks, ok, col0, code, QROW: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, PACK: tl.constexpr
):
    if PACK:
        offs, mask = tile_offsets(blocks, ok, col0 // 2, QROW, BP // 2)
        tl.store(q_ptr + offs, pack_pairs(code, BB, BP), mask=mask)
    else:
        offs, mask = tile_offsets(blocks, ok, col0, QROW, BP)
        tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, q_ptr, absmax_ptr, k_ptr, b_ptr, o_ptr, n_blocks,
    BLOCK: tl.constexpr, QROW: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, NCHUNK: tl.constexpr,
    LEVELS: tl.constexpr, IDENTITY: tl.constexpr, CLAMP: tl.constexpr, PACK: tl.constexpr,
    KEY_SCALE: tl.constexpr, KEY_OFFSET: tl.constexpr, KEY_SHIFT: tl.constexpr, KEY_MASK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    x_ptr += pid.to(tl.int64) * (BB * BLOCK)
    q_ptr += pid.to(tl.int64) * (BB * QROW)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    if NCHUNK == 1:
        offs, mask = tile_offsets(blocks, ok, 0, BLOCK, BP)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        inv = tl.math.div_rn(tl.full((BB,), 1.0, tl.float32), tl.maximum(absmax, tl.full((BB,), 1e-38, tl.float32)))
        code = _encode(x, inv, k_ptr, b_ptr, o_ptr, LEVELS, IDENTITY, CLAMP, KEY_SCALE, KEY_OFFSET, KEY_SHIFT, KEY_MASK)
        _store_codes(q_ptr, blocks, ok, 0, code, QROW, BB, BP, PACK)
    else:
        absmax = tl.zeros((BB,), tl.float32)
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        inv = tl.math.div_rn(tl.full((BB,), 1.0, tl.float32), tl.maximum(absmax, tl.full((BB,), 1e-38, tl.float32)))
        for c in range(NCHUNK):
            offs, mask = tile_offsets(blocks, ok, c * BP, BLOCK, BP)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            code = _encode(
                x, inv, k_ptr, b_ptr, o_ptr, LEVELS, IDENTITY, CLAMP, KEY_SCALE, KEY_OFFSET, KEY_SHIFT, KEY_MASK
            )
            _store_codes(q_ptr, blocks, ok, c * BP, code, QROW, BB, BP, PACK)
    tl.store(absmax_ptr + pid * BB + blocks, absmax, mask=ok)


@triton.jit
def _dequantize_kernel(
    q_ptr, absmax_ptr, cb_ptr, out_ptr, n_blocks,
    BLOCK: tl.constexpr, QROW: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr,
    PACK: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col0 = tl.program_id(1) * BP
    q_ptr += pid.to(tl.int64) * (BB * QROW)
    out_ptr += pid.to(tl.int64) * (BB * BLOCK)
    blocks = tl.arange(0, BB)
    ok = blocks < n_blocks - pid * BB
    absmax = tl.load(absmax_ptr + pid * BB + blocks, mask=ok, other=0.0)
    if PACK:
        offs, mask = tile_offsets(blocks, ok, col0 // 2, QROW, BP // 2)
        p = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        values = interleave(tl.load(cb_ptr + (p >> 4)), tl.load(cb_ptr + (p & 15)), BB, BP)
    else:
        offs, mask = tile_offsets(blocks, ok, col0, QROW, BP)
        values = tl.load(cb_ptr + tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32))
    offs, mask = tile_offsets(blocks, ok, col0, BLOCK, BP)
    store_out(out_ptr, offs, mask, values * absmax[:, None], OUT)


# ---- host side --------------------------------------------------------------------------------------------

_KEY_SCALES = {16: (8, 16, 32), 256: (128, 256)}  # grid steps per unit of v tried, coarsest first
_KEY_SHIFTS = [m / 256 for m in range(65)]  # 0, then shifts away from 0 tried in order
_MAX_ROWS = {16: 64, 256: 1024}  # table rows (a power of two, the mask + 1)


@dataclass(frozen=True)
class SearchTables:
    """A codebook's search data on one device (``search_tables``)."""

    bounds: Tensor  # fp32, sorted midpoints padded with +inf to 15 (16 values) or 256 entries
    order: Tensor  # uint8 sorted position -> code, padded to 16 or 256
    levels: int  # 4 (at most 16 values) or 8
    identity: bool  # order is the identity (sorted codebook)
    clamp: bool  # some bound lies outside [-1, 1]: the reference's clamp matters (binary search only)
    rows: Tensor | None  # bucket table (int64 rows for 16 values, uint8 base counts for 256), or None
    key_scale: float = 0.0
    key_offset: float = 0.0
    key_shift: int = 0  # fp32 bits of the shift away from 0 (0: none)
    key_mask: int = 0  # rows - 1; 0 selects the binary search


def _plan_buckets(bounds: Tensor, size: int) -> tuple[float, float, float, Tensor] | None:
    """(scale, offset, shift, row of each bound) of the coarsest grid that puts every bound in a row of
    its own while all of [-1, 1] (a few ulps beyond, as x * (1 / absmax) may land) fits the table."""
    for scale in _KEY_SCALES[size]:
        for shift in _KEY_SHIFTS:
            offset = float(scale + math.ceil(scale * shift) + 1)
            if 2 * offset + 1 > _MAX_ROWS[size]:
                break
            keys = bucket_keys(bounds + 0.0, scale, offset, shift)
            if keys.unique().numel() == keys.numel():
                return float(scale), offset, shift, keys
    return None


def _bucket_rows(bounds: Tensor, order: Tensor, size: int, keys: Tensor) -> Tensor:
    """Table rows from the rows of the bounds (``common.bucket_rows16``); for 256 values only each row's
    count of bounds in lower rows (uint8): its bound is ``bounds[count]``, read in the kernel."""
    if size == 16:
        return bucket_rows16(bounds, order, keys, _MAX_ROWS[size])
    return torch.searchsorted(keys, torch.arange(_MAX_ROWS[size])).to(torch.uint8)


# id(codebook) -> (weakref, version, device, tables): the search tables are a few small launches and a
# sync, so they are built once per codebook tensor (same object, unmodified) and device.
_TABLES: dict[int, tuple[weakref.ref, int, torch.device, SearchTables]] = {}


def search_tables(codebook: Tensor, device: torch.device) -> SearchTables:
    """The search tables of ``codebook`` on ``device`` (cached per codebook tensor)."""
    hit = _TABLES.get(id(codebook))
    if hit is not None and hit[0]() is codebook and hit[1] == codebook._version and hit[2] == device:
        return hit[3]
    cb = codebook.to(device=device, dtype=torch.float32).reshape(-1)
    n = cb.numel()
    if not 2 <= n <= 256:
        raise ValueError(f"a codebook needs 2 to 256 values, got {n}")
    bounds, order = codebook_search_tables(cb)  # the reference's own tables, on the same device
    size = 16 if n <= 16 else 256
    padded_bounds = torch.full((size - 1 if size == 16 else size,), float("inf"), device=device)
    padded_bounds[: n - 1] = bounds
    padded_order = torch.zeros(size, dtype=torch.uint8, device=device)
    padded_order[:n] = order
    identity = bool(torch.equal(order.cpu(), torch.arange(n, dtype=torch.uint8)))
    clamp = bool((bounds.abs() > 1).any())
    tables = SearchTables(padded_bounds, padded_order, 4 if size == 16 else 8, identity, clamp, None)
    plan = None if clamp else _plan_buckets(bounds.cpu(), size)
    if plan is not None:
        scale, offset, shift, keys = plan
        rows = _bucket_rows(bounds.cpu(), order.cpu(), size, keys).to(device)
        shift_bits = int(torch.tensor(shift, dtype=torch.float32).view(torch.int32))
        tables = SearchTables(
            padded_bounds, padded_order, tables.levels, identity, clamp, rows, scale, KEY_MAGIC + offset,
            shift_bits, _MAX_ROWS[size] - 1,
        )  # fmt: skip
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[id(codebook)] = (weakref.ref(codebook), codebook._version, device, tables)
    return tables


def quantize_codebook(x: Tensor, block_size: int, codebook: Tensor, pack: bool) -> tuple[Tensor, Tensor]:
    """(rows, cols) float -> (codes uint8 (rows, cols // 2) packed or (rows, cols), absmax fp32
    (rows, cols // block_size)); bit-identical to ``reference.quantize_codebook``."""
    check_2d(x, block_size)
    tb = search_tables(codebook, x.device)
    if pack and tb.levels != 4:
        raise ValueError("only a codebook of at most 16 values packs two codes per byte")
    rows, cols = x.shape
    x = x.contiguous()
    qrow = block_size // 2 if pack else block_size
    q = torch.empty((rows, cols // 2 if pack else cols), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((rows, cols // block_size), dtype=torch.float32, device=x.device)
    t = plan_tiling(x.numel(), block_size)
    if t.n_blocks:
        _quantize_kernel[t.grid](
            x, q, absmax, tb.bounds if tb.rows is None else tb.rows, tb.bounds, tb.order, t.n_blocks,
            BLOCK=block_size, QROW=qrow, BB=t.blocks_per_program, BP=t.width, NCHUNK=t.chunks,
            LEVELS=tb.levels, IDENTITY=tb.identity, CLAMP=tb.clamp, PACK=pack, KEY_SCALE=tb.key_scale,
            KEY_OFFSET=tb.key_offset, KEY_SHIFT=tb.key_shift, KEY_MASK=tb.key_mask, num_warps=t.num_warps,
        )  # fmt: skip
    return q, absmax


def dequantize_codebook(
    qdata: Tensor, scale: Tensor, codebook: Tensor, block_size: int, packed: bool, dtype: torch.dtype
) -> Tensor:
    """codebook[code] * absmax, cast to ``dtype``; (rows, cols) as ``reference.dequantize_codebook``."""
    rows, width = qdata.shape
    cols = width * 2 if packed else width
    if block_size <= 0 or cols % block_size:
        raise ValueError(f"block_size {block_size} must divide the {cols} columns")
    out, target = out_buffer((rows, cols), dtype, qdata.device)
    cb = codebook.to(device=qdata.device, dtype=torch.float32).contiguous()
    t = plan_tiling(rows * cols, block_size, dequant=True)
    if t.n_blocks:
        grid = (t.grid[0], t.chunks)
        _dequantize_kernel[grid](
            qdata.contiguous(), scale.contiguous(), cb, target, t.n_blocks,
            BLOCK=block_size, QROW=block_size // 2 if packed else block_size, BB=t.blocks_per_program,
            BP=t.width, PACK=packed, OUT=out_code(dtype), num_warps=t.num_warps,
        )  # fmt: skip
    return out
