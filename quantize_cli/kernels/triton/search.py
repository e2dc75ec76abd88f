"""Triton NVFP4/MXFP4 block-scale searches: the signatures of ``scale_search.search_nvfp4`` and
``scale_search.search_mxfp4`` (SSE when ``hessian`` is None, else r^T H_b r).

A program takes ``BB`` rows of one column block. Candidates are ranked as ``scale_search`` ranks them,
on codes computed in fp16 from ``z = |x| p`` (p a power of two per block) and ``rho = (1 / t) / p``
(``1 / t`` rounded once; NVFP4 reads ``t`` and ``1 / t`` of every E4M3 code from a per-tensor table,
``_table_kernel``), rounded to the E2M1 grid with a magic-number addition (``_e2m1_round_half``: FMAs
and min / max, no compares and selects, built in both halves of a register at once). Every such step is
a packed two-wide fp16 instruction (``HMUL2``, ``HMNMX2``, ``HFMA2``), about half the fp32 instruction
count, and rounds as PyTorch's fp16 operations do, so the codes are the reference's bit for bit. The
kept scale's codes are encoded in fp32 from the input, as the naive quantizers do. The candidates are
the steps of ``scale_search``'s sets, which skip steps: the loop runs over their span and a compile-time
mask drops the others.

SSE (``_search_kernel``). The tile is (NCH, BB, W): each row's block is NCH chunks of W contiguous
elements, all held by one thread for narrow blocks (``_load_chunks``), so per-block work (candidate
scale, its reciprocal, the error reduction) is done once per block, in registers. The squared error is
``scale_search.sse_fp16``'s, in fp16 too, summed in its halving order with no fused multiply-adds
(``enable_fp_fusion=False``; the rounding's explicit FMAs round as its adds would), so the strict ``<``
sees the reference's values and the scales equal its bit for bit.

Hessian (``_hessian_kernel``). Per candidate, ``t (t (k H).k - 2 (k H).x) = r^T H r - x^T H x`` with ``k``
the signed fp16 ranking codes (``scale_search.hessian_fp16``): ``k H`` on the tensor cores in fp16, against H
scaled by powers of two (per block, and per channel as ``S^-1 H S^-1`` with the codes and x times S,
``_hessian_parts``) and split in two fp16 parts (about 2**-22 relative accuracy; k S is exact in fp16), as
one dot of ``[k | k]`` with the parts stacked (K = 32: the tensor cores take both halves without waiting in
between); everything else in the dot's accumulator layout, where x is brought by a dot with the identity,
so the codes feed the next dot without a trip through shared memory. A program takes several row tiles of one
column block, so H_b is prepared once for them, and loads the next tile while it tries the current one's
candidates (Triton's pipeliner does not take the loop). Its rounding is of the size of x^T H x, and no PyTorch
reference reproduces the dots' summation order: where two candidates' errors lie that close the kernel may
keep the other one; tests bound how often and by how much (``tests/_kernel_cases.check_hessian_choice``).
The codes are encoded from the input as loaded, so they are the reference's under the kept scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import scale_search
from ..constants import E2M1_EMAX, E8M0_BIAS, F4_E2M1_MAX, F8_E4M3_MAX
from .common import MAX_WIDTH, check_2d, e2m1_index, e4m3_decode, e4m3_encode

Tensor = torch.Tensor

SEARCH_ROWS = 128  # rows (blocks) per program for narrow blocks: one per thread with SEARCH_WARPS = 4
SEARCH_WARPS = 4
SEARCH_TILE = 4096  # elements per program for wide blocks
HESSIAN_MAX_WIDTH = 64  # widest (padded) block the Hessian kernel takes: H_b is a (64, 64) fp32 tile
HESSIAN_ROWS = 64  # rows per Hessian program: one warpgroup's tensor-core tile (M = 64)
HESSIAN_WARPS = 4
HESSIAN_TILES = 8  # row tiles per Hessian program: H_b is prepared once for them (1, 2, 4, 8 timed: 8 fastest)
HESSIAN_MAXNREG = 96  # 16-bit inputs, blocks of 16: the next tile's prefetch would take 126 registers, and 5
# programs per multiprocessor would drop to 3 (timed: 3-4 % faster held to 96; fp32 and wider blocks would spill)
FLT_MAX = tl.constexpr(scale_search.FLT_MAX)
_TAB = 256  # NVFP4 candidate table entries: every naive E4M3 code (0..0x7E) plus the steps above it


# ---- per-block and per-element pieces ------------------------------------------------------------------------


@triton.jit
def _expand(v):
    """(BB,) per-block value -> (1, BB, 1), to broadcast over the (NCH, BB, W) tile."""
    return v[None, :, None]


@triton.jit
def _reciprocal(t):
    """``scale_search.reciprocal``: 1 / t rounded once, at most FLT_MAX (t tiny), 0 for t == 0."""
    zero = t == 0.0
    inv = tl.math.div_rn(tl.full(t.shape, 1.0, tl.float32), tl.where(zero, 1.0, t))
    return tl.where(zero, 0.0, tl.minimum(inv, FLT_MAX))


HALF_MAX = tl.constexpr(scale_search.HALF_MAX)


@triton.jit
def _normaliser(amax):
    """``scale_search.normaliser``: p = 2**-e and 1 / p for e = floor(log2(amax)) clamped to [-126, 126]."""
    e = tl.minimum(tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -126), 126)
    return ((127 - e) << 23).to(tl.float32, bitcast=True), ((127 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_round_half(y):
    """The E2M1 magnitude nearest to fp16 y >= 0, ties to even, saturating at 6: y + M with M = 1.5 * 2**10 * u
    (u the grid spacing at y: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]) lies in a binade whose fp16 ulp is u,
    so the add rounds y to a multiple of u, ties to an even one (M / u is even), E2M1's even mantissa;
    subtracting M is exact. M = 768 m with m = 2**e the power of two of max(y, 1) (its exponent bits), and
    both steps are fused multiply-adds (768 m is exact, so each rounds once, as the plain add and subtract
    would). Packed fp16 pairs make this one min, one max, one logic op and two FMAs per two elements."""
    yc = tl.minimum(y, tl.full(y.shape, 6.0, tl.float16))  # typed: Triton 3.6 widens Python constants
    mb = tl.maximum(yc, tl.full(y.shape, 1.0, tl.float16)).to(tl.int16, bitcast=True)
    m = (mb & tl.full(y.shape, 0x7C00, tl.int16)).to(tl.float16, bitcast=True)
    c = tl.full(y.shape, 768.0, tl.float16)
    return tl.fma(m, -c, tl.fma(m, c, yc))


@triton.jit
def _halving_sum(v, NCH: tl.constexpr, BB: tl.constexpr, W: tl.constexpr, LOG_NCH: tl.constexpr, LOG_W: tl.constexpr):
    """(NCH, BB, W) -> (BB,) in ``scale_search.halving_sum`` order over each block's NCH * W elements (element
    j = c W + w): element j plus element j + NCH W / 2, and again on the halves, so chunks fold first."""
    for k in tl.static_range(LOG_NCH):
        a, b = tl.split(tl.permute(tl.reshape(v, (2, NCH >> (k + 1), BB, W)), (1, 2, 3, 0)))
        v = a + b
    v = tl.reshape(v, (BB, W))
    for k in tl.static_range(LOG_W):
        a, b = tl.split(tl.permute(tl.reshape(v, (BB, 2, W >> (k + 1))), (0, 2, 1)))
        v = a + b
    return tl.reshape(v, (BB,))


@triton.jit
def _dot16(a, b, acc, EMULATE: tl.constexpr):
    """a @ b (+ acc) of 16-bit operands, fp32 accumulation. EMULATE (Triton's CPU interpreter, whose dot
    multiplies bf16 operands as their raw bits): the same products in an fp32 dot, exact for 16-bit values."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _bf16_split(h):
    """h (fp32) as three bf16 parts, largest first, whose sum is h to within 2**-24 relatively: each part
    rounds what the previous ones left (every residual is exact in fp32)."""
    h1 = h.to(tl.bfloat16)
    r = h - h1.to(tl.float32)
    h2 = r.to(tl.bfloat16)
    return h1, h2, (r - h2.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _load_chunks(
    x_ptr, row0, col0, rows, cols, BLOCK: tl.constexpr, BB: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr
):
    """The (NCH, BB, W) tile of rows row0.. and the block at col0 (element c W + w of block b at [c, b, w]),
    loaded as NCH * BB rows of W in chunk-major order (row c BB + b) and reshaped. A (NCH, BB, W) load would
    spread a block's chunks over lanes (they are adjacent in memory) and every per-block step and the
    error's halving sum would cross lanes through shared memory; this way, with BB a multiple of the
    thread count, a thread's rows are whole blocks."""
    r = tl.arange(0, NCH * BB)
    row = row0 + r % BB
    j = (r // BB)[:, None] * W + tl.arange(0, W)[None, :]
    mask = (row < rows)[:, None] & (j < BLOCK)
    x = tl.load(x_ptr + ((row.to(tl.int64) * cols + col0)[:, None] + j), mask=mask, other=0.0)
    return tl.reshape(x, (NCH, BB, W))


@triton.jit
def _naive(amax, gs, NVFP4: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr, BIAS: tl.constexpr):
    """The naive per-block scale code, as the reference: E4M3 bits of (amax / 6) / gs (true divisions,
    saturating at 448), or the unbiased exponent floor(log2(amax)) - 2 (unclamped: -129 for 0)."""
    if NVFP4:
        block = tl.math.div_rn(tl.math.div_rn(amax, tl.full(amax.shape, EMAX, tl.float32)), tl.zeros_like(amax) + gs)
        return e4m3_encode(tl.minimum(block, FMAX))
    else:
        return ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - BIAS - EMAX


@triton.jit
def _candidate(naive, i, tab, NVFP4: tl.constexpr, STEP0: tl.constexpr, BIAS: tl.constexpr, TAB: tl.constexpr):
    """Per-block candidate ``i`` (step STEP0 + i): its scale t and ``reciprocal(t)``. NVFP4 reads both from
    the per-tensor table (entry naive + i of ``_table_kernel``; ``tab`` is the per-block pointer to entry
    naive, so a constant i is an address offset); MXFP4 builds the powers of two from bits (2**-127 is the
    subnormal with fraction bit 22)."""
    if NVFP4:
        return tl.load(tab + i), tl.load(tab + (TAB + i))
    else:
        e = tl.minimum(tl.maximum(naive + (STEP0 + i), -BIAS), BIAS)
        t = tl.where(e == -BIAS, 0x400000, (e + BIAS) << 23).to(tl.float32, bitcast=True)
        inv = tl.where(e == BIAS, 0x400000, (BIAS - e) << 23).to(tl.float32, bitcast=True)
        return t, inv


@triton.jit
def _table_kernel(gs_ptr, tab_ptr, STEP0: tl.constexpr, TAB: tl.constexpr):
    """NVFP4 candidates for every naive code at once: tab[k] = t = e4m3(c) * gs and tab[TAB + k] =
    reciprocal(t), c = clamp(k + STEP0, 0, 0x7E) (candidate i of naive code n is entry n + i)."""
    k = tl.arange(0, TAB)
    t = e4m3_decode(tl.minimum(tl.maximum(k + STEP0, 0), 0x7E)) * tl.load(gs_ptr)
    tl.store(tab_ptr + k, t)
    tl.store(tab_ptr + TAB + k, _reciprocal(t))


# ---- the kernel ------------------------------------------------------------------------------------------------


@triton.jit
def _search_kernel(
    x_ptr, gs_ptr, tab_ptr, q_ptr, scale_ptr, rows, cols,
    BLOCK: tl.constexpr, BB: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr,
    LOG_NCH: tl.constexpr, LOG_W: tl.constexpr, NVFP4: tl.constexpr,
    STEP0: tl.constexpr, SPAN: tl.constexpr, MASK: tl.constexpr,
    EMAX: tl.constexpr, FMAX: tl.constexpr, BIAS: tl.constexpr, TAB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nb = cols // BLOCK
    cb = pid % nb  # column block, fastest: programs running together share rows, so writes merge in L2
    row = (pid // nb) * BB + tl.arange(0, BB)
    row_ok = row < rows
    base = row.to(tl.int64) * cols + cb * BLOCK
    x = _load_chunks(x_ptr, (pid // nb) * BB, cb * BLOCK, rows, cols, BLOCK, BB, NCH, W).to(tl.float32)
    mag = tl.abs(x)
    gs = tl.load(gs_ptr)  # 1 for MXFP4
    amax = tl.max(tl.max(mag, axis=2), axis=0)
    naive = _naive(amax, gs, NVFP4, EMAX, FMAX, BIAS)
    tab = tab_ptr + naive  # NVFP4's table entry of the naive scale (MXFP4 reads no table)

    p, p_inv = _normaliser(amax)
    z = (mag * _expand(p)).to(tl.float16)
    best_err = tl.full((BB,), float("inf"), tl.float16)
    best = tl.zeros((BB,), tl.int32) - STEP0  # the naive scale where no error is finite, as the reference
    for i in tl.static_range(SPAN):
        if (MASK >> i) & 1:  # step STEP0 + i is a candidate (resolved at compile time)
            t, inv = _candidate(naive, i, tab, NVFP4, STEP0, BIAS, TAB)
            rho = tl.minimum(inv * p_inv, HALF_MAX).to(tl.float16)
            sig = tl.minimum(t * p, HALF_MAX).to(tl.float16)
            r = z - _e2m1_round_half(z * _expand(rho)) * _expand(sig)
            err = _halving_sum(r * r, NCH, BB, W, LOG_NCH, LOG_W)
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best = tl.where(better, i, best)

    _, inv = _candidate(naive, best, tab, NVFP4, STEP0, BIAS, TAB)
    idx = e2m1_index(mag * _expand(inv))
    codes = tl.where((x < 0.0) & (idx > 0), idx + 8, idx)
    hi, lo = tl.split(tl.reshape(codes, (NCH, BB, W // 2, 2)))
    jq = tl.arange(0, NCH)[:, None, None] * (W // 2) + tl.arange(0, W // 2)[None, None, :]
    q_mask = row_ok[None, :, None] & (jq < BLOCK // 2)
    tl.store(q_ptr + ((base // 2)[None, :, None] + jq), ((hi << 4) | lo).to(tl.uint8), mask=q_mask)
    if NVFP4:
        stored = tl.minimum(tl.maximum(naive + (STEP0 + best), 0), 0x7E)
    else:
        stored = tl.minimum(tl.maximum(naive + (STEP0 + best), -BIAS), BIAS) + BIAS
    tl.store(scale_ptr + row.to(tl.int64) * (cols // BLOCK) + cb, stored.to(tl.uint8), mask=row_ok)


@triton.jit
def _hessian_parts(h_ptr, cb, BLOCK: tl.constexpr, BP: tl.constexpr):
    """Column block ``cb``'s H_b as (two fp16 parts of S^-1 H_b S^-1 times a power of two, s as a (BP,) row):
    S = diag(s) with s_i = 2**floor(floor(log2(H_ii)) / 2) (in [2**-12, 1], after H_b is scaled so its entries
    lie below 2), so the scaled diagonal lies in [1, 4) and, H_b being positive semi-definite, every entry
    below 4: the small channels' entries keep the split's relative precision where H_b's channels differ by
    orders of magnitude (unscaled, their residual parts fall among fp16's subnormals). Codes times s stay
    exact."""
    col = tl.arange(0, BP)
    eye = col[:, None] == col[None, :]
    h_mask = (col[:, None] < BLOCK) & (col[None, :] < BLOCK)
    h = tl.load(h_ptr + cb * (BLOCK * BLOCK) + col[:, None] * BLOCK + col[None, :], mask=h_mask, other=0.0)
    h = h * _normaliser(tl.max(tl.max(tl.abs(h), axis=1), axis=0))[0]  # entries below 2
    diag = tl.where(eye, h, 0.0)
    e_row = _half_log2(tl.sum(diag, axis=1))  # s_i = 2**e_i, along rows and along columns
    e_col = _half_log2(tl.sum(diag, axis=0))
    h = h * ((127 - e_row) << 23).to(tl.float32, bitcast=True)[:, None]  # exact: powers of two
    h = h * ((127 - e_col) << 23).to(tl.float32, bitcast=True)[None, :]
    h = h * _normaliser(tl.max(tl.max(tl.abs(h), axis=1), axis=0))[0]  # below 2 again (H_b not PSD: no overflow)
    h1 = h.to(tl.float16)
    return h1, (h - h1.to(tl.float32)).to(tl.float16), ((127 + e_row) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(x_ptr, row0, cb, rows, cols, BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr):
    """Rows row0.. (BB of them) of column block ``cb``, zero-padded to BP columns and from row ``rows`` on."""
    row = row0 + tl.arange(0, BB)
    col = tl.arange(0, BP)
    mask = (row < rows)[:, None] & (col < BLOCK)[None, :]
    return tl.load(x_ptr + ((row.to(tl.int64) * cols + cb * BLOCK)[:, None] + col[None, :]), mask=mask, other=0.0)


@triton.jit
def _half_log2(d):
    """floor(floor(log2(d)) / 2) clamped to [-12, 0] (d in [0, 2); -12 for 0 and subnormals)."""
    return tl.minimum(tl.maximum((((d.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127) >> 1, -12), 0)


@triton.jit
def _hessian_kernel(
    x_ptr, h_ptr, gs_ptr, tab_ptr, q_ptr, scale_ptr, rows, cols,
    BLOCK: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, TILES: tl.constexpr, NVFP4: tl.constexpr,
    STEP0: tl.constexpr, SPAN: tl.constexpr, MASK: tl.constexpr, EMAX: tl.constexpr, FMAX: tl.constexpr,
    BIAS: tl.constexpr, TAB: tl.constexpr, SPLIT_X: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Hessian search over TILES tiles of BB rows of one column block (H_b prepared once, ``_hessian_parts``):
    per candidate, ``t (t (k' Hs).k' - 2 (k' Hs).x') = r^T H r - x^T H x`` (times a power of two per block)
    with ``k' = k s`` the signed fp16 ranking codes times the channel scales, ``x' = x s`` and ``Hs =
    S^-1 H S^-1``; ``k' Hs`` is one fp16 dot of ``[k' | k']`` against the parts stacked. Everything per
    element lives in the dots' accumulator layout (x is moved there by a dot with the identity), so the
    codes feed the next dot without a trip through shared memory."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # from the end: the global-scale pass just read it last
    nb = cols // BLOCK
    cb = pid % nb
    col = tl.arange(0, BP)
    eye = col[:, None] == col[None, :]
    zero = tl.zeros((BB, BP), tl.float32)
    h1, h2, s = _hessian_parts(h_ptr, cb, BLOCK, BP)
    s = _dot16(tl.full((BB, BP), 1.0, tl.float16), tl.where(eye, s[:, None], 0.0).to(tl.float16), zero, EMULATE)
    s16 = s.to(tl.float16)  # the channel scales in the accumulator layout (one identity-like dot, exact)
    s2 = 2.0 * s
    gs = tl.load(gs_ptr)  # 1 for MXFP4
    h12 = tl.reshape(tl.permute(tl.join(h2, h1), (2, 0, 1)), (2 * BP, BP))  # [h2; h1]: k H as one K = 2 BP dot
    row_end = tl.minimum(rows, (pid // nb + 1) * TILES * BB)  # this program's rows end here
    x_next = _load_tile(x_ptr, (pid // nb) * TILES * BB, cb, row_end, cols, BLOCK, BB, BP)
    for tile in tl.range(TILES, num_stages=1):  # not software-pipelined (its dots cannot be): prefetched by hand
        row = ((pid // nb) * TILES + tile) * BB + tl.arange(0, BB)
        row_ok = row < rows
        base = row.to(tl.int64) * cols + cb * BLOCK
        x_in = x_next
        if SPLIT_X:  # fp32: three bf16 parts, each times the identity, add up to x exactly
            xh, xm, xl = _bf16_split(x_in)
            e16 = tl.where(eye, 1.0, 0.0).to(tl.bfloat16)
            x = _dot16(xh, e16, _dot16(xm, e16, _dot16(xl, e16, zero, EMULATE), EMULATE), EMULATE)
        else:
            x = _dot16(x_in, tl.where(eye, 1.0, 0.0).to(x_in.dtype), zero, EMULATE)
        # the next tile's load runs while this one's candidates are tried (after the last, all masked off)
        x_next = _load_tile(x_ptr, ((pid // nb) * TILES + tile + 1) * BB, cb, row_end, cols, BLOCK, BB, BP)
        mag = tl.abs(x)
        sign = ((x.to(tl.uint32, bitcast=True) & 0x80000000) >> 16).to(tl.int16)
        sigma = (s16.to(tl.int16, bitcast=True) | sign).to(tl.float16, bitcast=True)  # +-s: a code's sign and scale
        amax = tl.max(mag, axis=1)
        naive = _naive(amax, gs, NVFP4, EMAX, FMAX, BIAS)
        tab = tab_ptr + naive  # NVFP4's table entry of the naive scale (MXFP4 reads no table)
        p, p_inv = _normaliser(amax)
        z = (mag * p[:, None]).to(tl.float16)
        x2 = x * s2

        best_err = tl.full((BB,), float("inf"), tl.float32)
        best = tl.zeros((BB,), tl.int32) - STEP0  # the naive scale where no error is finite, as the reference
        for i in tl.static_range(SPAN):
            if (MASK >> i) & 1:  # step STEP0 + i is a candidate (resolved at compile time)
                t, inv = _candidate(naive, i, tab, NVFP4, STEP0, BIAS, TAB)
                rho = tl.minimum(inv * p_inv, HALF_MAX).to(tl.float16)
                k = _e2m1_round_half(z * rho[:, None])
                k = k * sigma  # exact (a power of two); a zero's sign does not matter
                kh = _dot16(tl.reshape(tl.permute(tl.join(k, k), (0, 2, 1)), (BB, 2 * BP)), h12, zero, EMULATE)
                err = t * tl.sum(kh * (t[:, None] * k.to(tl.float32) - x2), axis=1)
                better = err < best_err
                best_err = tl.where(better, err, best_err)
                best = tl.where(better, i, best)

        # the codes from the input as loaded (exact for every dtype), under the kept scale
        xe = x_in.to(tl.float32)
        _, inv = _candidate(naive, best, tab, NVFP4, STEP0, BIAS, TAB)
        idx = e2m1_index(tl.abs(xe) * inv[:, None])
        codes = tl.where((xe < 0.0) & (idx > 0), idx + 8, idx)
        hi, lo = tl.split(tl.reshape(codes, (BB, BP // 2, 2)))
        jq = tl.arange(0, BP // 2)
        q_mask = row_ok[:, None] & (jq[None, :] < BLOCK // 2)
        tl.store(q_ptr + ((base // 2)[:, None] + jq[None, :]), ((hi << 4) | lo).to(tl.uint8), mask=q_mask)
        if NVFP4:
            stored = tl.minimum(tl.maximum(naive + (STEP0 + best), 0), 0x7E)
        else:
            stored = tl.minimum(tl.maximum(naive + (STEP0 + best), -BIAS), BIAS) + BIAS
        tl.store(scale_ptr + row.to(tl.int64) * (cols // BLOCK) + cb, stored.to(tl.uint8), mask=row_ok)


# ---- host side --------------------------------------------------------------------------------------------


def _tiling(block_size: int, elem_size: int) -> tuple[int, int, int]:
    """SSE (BB, NCH, W) for a block of ``block_size`` elements: W = one 16-byte vector of the input (at most the
    padded block), NCH chunks of it per block; narrow blocks one per thread, wide ones split over threads."""
    width = triton.next_power_of_2(block_size)
    w = min(width, max(2, 16 // elem_size))
    rows = SEARCH_ROWS if width <= 32 else max(1, SEARCH_TILE // width)
    return rows, width // w, w


def _search(
    x: Tensor, block_size: int, global_scale: Tensor | None, hessian: Tensor | None, nvfp4: bool
) -> tuple[Tensor, Tensor] | None:
    check_2d(x, block_size)
    if block_size % 2:
        raise ValueError(f"4-bit codes pack in pairs: block_size {block_size} must be even")
    rows, cols = x.shape
    nb = cols // block_size
    if hessian is not None and tuple(hessian.shape) != (nb, block_size, block_size):
        want = (nb, block_size, block_size)
        raise ValueError(f"hessian must be the {want} diagonal blocks, got {tuple(hessian.shape)}")
    width = triton.next_power_of_2(block_size)
    if width > (MAX_WIDTH if hessian is None else HESSIAN_MAX_WIDTH):
        return None
    x = x.contiguous()
    q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, nb), dtype=torch.uint8, device=x.device)
    if nvfp4:
        steps = scale_search.NVFP4_STEPS if hessian is None else scale_search.NVFP4_HESSIAN_STEPS
    else:
        steps = scale_search.MXFP4_STEPS
    assert list(steps) == sorted(set(steps))  # ascending, as the reference tries them (the first wins a tie)
    if nvfp4:  # NVFP4 reads its candidates from a table of every E4M3 code's scale and reciprocal
        gs = global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
        tab = torch.empty(2 * _TAB, dtype=torch.float32, device=x.device)
        _table_kernel[(1,)](gs, tab, STEP0=steps[0], TAB=_TAB, num_warps=4, enable_fp_fusion=False)
    else:
        gs = tab = torch.ones(1, dtype=torch.float32, device=x.device)
    if not x.numel():
        return q, scale
    mask = sum(1 << (k - steps[0]) for k in steps)  # candidate i of the span is step steps[0] + i
    common = dict(
        NVFP4=nvfp4, STEP0=steps[0], SPAN=steps[-1] - steps[0] + 1, MASK=mask,
        EMAX=F4_E2M1_MAX if nvfp4 else E2M1_EMAX, FMAX=F8_E4M3_MAX, BIAS=E8M0_BIAS, TAB=_TAB,
    )  # fmt: skip
    if hessian is None:
        bb, nch, w = _tiling(block_size, x.element_size())
        _search_kernel[(nb * triton.cdiv(rows, bb),)](
            x, gs, tab, q, scale, rows, cols, BLOCK=block_size, BB=bb, NCH=nch, W=w,
            LOG_NCH=nch.bit_length() - 1, LOG_W=w.bit_length() - 1, **common,
            num_warps=SEARCH_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    else:
        h = hessian.to(device=x.device, dtype=torch.float32).contiguous()
        narrow = width <= 16 and x.element_size() == 2
        _hessian_kernel[(nb * triton.cdiv(rows, HESSIAN_ROWS * HESSIAN_TILES),)](
            x, h, gs, tab, q, scale, rows, cols, BLOCK=block_size, BB=HESSIAN_ROWS, BP=max(width, 16),
            TILES=HESSIAN_TILES,
            SPLIT_X=x.dtype == torch.float32, EMULATE=x.device.type != "cuda",
            **common, num_warps=HESSIAN_WARPS, **({"maxnreg": HESSIAN_MAXNREG} if narrow else {}),
        )  # fmt: skip
    return q, scale


def search_nvfp4(x: Tensor, block_size: int, global_scale: Tensor, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    """``scale_search.search_nvfp4`` on the GPU: (packed E2M1 codes uint8 (rows, cols // 2), E4M3 block
    scales float8_e4m3fn (rows, cols // block_size)). Blocks wider than the kernel takes run the reference."""
    out = _search(x, block_size, global_scale, hessian, nvfp4=True)
    if out is None:
        return scale_search.search_nvfp4(x, block_size, global_scale, hessian)
    return out[0], out[1].view(torch.float8_e4m3fn)


def search_mxfp4(x: Tensor, block_size: int, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    """``scale_search.search_mxfp4`` on the GPU: (packed E2M1 codes uint8 (rows, cols // 2), biased E8M0
    exponents uint8 (rows, cols // block_size)). Blocks wider than the kernel takes run the reference."""
    out = _search(x, block_size, None, hessian, nvfp4=False)
    return scale_search.search_mxfp4(x, block_size, hessian) if out is None else out
