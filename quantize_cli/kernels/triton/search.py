"""Triton NVFP4/MXFP4 block-scale searches: the signatures of ``scale_search.search_nvfp4`` and
``scale_search.search_mxfp4`` (SSE when ``hessian`` is None, else r^T H_b r).

A program takes ``BB`` rows of one column block ``b``, so the Hessian block ``H_b`` is loaded once
and serves every row. The tile is (NCH, BB, W): each row's block is NCH chunks of W contiguous
elements, all held by one thread for narrow blocks, so per-block work (candidate scale, thresholds,
error reduction) is done once per block rather than once per thread. Per candidate, in registers:
the codes, ``r = x - Q(x)``, the block error, the best so far; codes and the scale are written once.

Exactness. SSE codes and scales equal the reference bit for bit: the error ``r.r`` is summed in the
reference's fixed pairwise order (``scale_search.pairwise_sum``) with no fused multiply-adds
(``enable_fp_fusion=False``), so the strict ``<`` sees the same floats. The Hessian error comes from
``tl.dot`` on the tensor cores (3 bf16 or tf32 passes, about fp32 accuracy), whose summation order no
PyTorch reference reproduces, so where two candidates' errors lie within rounding of each other the
kernel may pick the other one; tests bound how often and by how much (tests/test_triton_kernels.py).

No division per element. The reference encodes ``e2m1(fl(x / t))``. For each strict E2M1 threshold
``T`` (``common._T``) let ``U`` be the midpoint of ``T`` and the next fp32 up: ``fl(a / t) > T`` iff
``a / t > U`` iff ``a > U t``, because ``a / t == U`` would need ``a`` to carry 25 significant bits.
``U t`` is exact in fp64 (25 + 24 bits), and for an fp32 ``a``, ``a > U t`` iff ``a > L`` with ``L``
the largest fp32 below ``U t`` (its fp64 mantissa truncated). A block is scaled by the power of two
``s`` that brings its largest candidate scale into [1, 2), so every ``L`` is a normal fp32 and the
truncation is two integer operations; ``|x| s`` and ``t s`` are exact (or far below every threshold).
The dequantized magnitudes ``fl(v_k t)`` are per-block products, as the reference's ``decode(code) * t``.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import scale_search
from ..constants import E2M1_EMAX, E8M0_BIAS, F4_E2M1_MAX, F8_E4M3_MAX
from .common import _T, MAX_WIDTH, check_2d, e4m3_decode, e4m3_encode, safe_div

Tensor = torch.Tensor


def _midpoint_above(t: float) -> float:
    """The fp64 midpoint of fp32 ``t`` and the next fp32 above it (exact: 25 significant bits)."""
    t32 = np.float32(t)
    return float((np.float64(t32) + np.float64(np.nextafter(t32, np.float32(np.inf)))) / 2)


_U = [_midpoint_above(t) for t in _T]
# E2M1 repeats itself an octave up: the upper midpoints are the middle ones times 2 and 4, so their
# thresholds are exact doublings of the middle ones and only four need the fp64 product.
assert (_U[4], _U[5], _U[6]) == (2 * _U[2], 2 * _U[3], 4 * _U[2])
E2M1_U0, E2M1_U1, E2M1_U2, E2M1_U3 = (tl.constexpr(u) for u in _U[:4])

SEARCH_ROWS = 128  # rows (blocks) per program for narrow blocks: one per thread with 4 warps
SEARCH_TILE = 4096  # elements per program for wide blocks
HESSIAN_MAX_WIDTH = 64  # widest (padded) block the Hessian kernel takes: H_b is a (64, 64) fp32 tile
HESSIAN_PRECISION = "tf32x3"


# ---- per-block pieces --------------------------------------------------------------------------------------


@triton.jit
def _threshold(ts64, U: tl.constexpr):
    """The largest fp32 below U * ts (exact in fp64); ts in [2**-26, 4), so the result is a normal fp32
    and truncating the fp64 mantissa to 23 bits (then rebiasing the exponent) rounds it down."""
    p = ts64 * tl.full(ts64.shape, U, tl.float64)
    bits = (p.to(tl.int64, bitcast=True) >> 29) - (896 << 23)  # 896 = 1023 - 127
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _thresholds(ts):
    """The seven per-block thresholds L_k (scaled domain) of the E2M1 encode under scale ts."""
    ts64 = ts.to(tl.float64)
    l2 = _threshold(ts64, E2M1_U2)
    l3 = _threshold(ts64, E2M1_U3)
    return _threshold(ts64, E2M1_U0), _threshold(ts64, E2M1_U1), l2, l3, l2 * 2.0, l3 * 2.0, l2 * 4.0


@triton.jit
def _expand(v):
    """(BB,) per-block value -> (1, BB, 1), to broadcast over the (NCH, BB, W) tile."""
    return v[None, :, None]


@triton.jit
def _encode_index(ms, ts):
    """E2M1 magnitude index 0..7 of every scaled magnitude ``ms`` under the per-block scaled scale ``ts``
    (3-level binary search, thresholds carried as in ``common.e2m1_encode``)."""
    L0, L1, L2, L3, L4, L5, L6 = _thresholds(ts)
    c = ms > _expand(L3)
    idx = tl.where(c, 4, 0)
    h0 = tl.where(c, _expand(L4), _expand(L0))
    h1 = tl.where(c, _expand(L5), _expand(L1))
    h2 = tl.where(c, _expand(L6), _expand(L2))
    c = ms > h1
    idx += tl.where(c, 2, 0)
    idx += tl.where(ms > tl.where(c, h2, h0), 1, 0)
    return idx


@triton.jit
def _dequantized_magnitude(ms, ts, t):
    """|Q(x)| = fl(v_idx * t) per element, by the same binary search carrying the eight per-block
    products instead of the index."""
    L0, L1, L2, L3, L4, L5, L6 = _thresholds(ts)
    D1, D2, D3 = _expand(0.5 * t), _expand(t), _expand(1.5 * t)
    D4, D5, D6, D7 = _expand(2.0 * t), _expand(3.0 * t), _expand(4.0 * t), _expand(6.0 * t)
    c = ms > _expand(L3)
    h0 = tl.where(c, _expand(L4), _expand(L0))
    h1 = tl.where(c, _expand(L5), _expand(L1))
    h2 = tl.where(c, _expand(L6), _expand(L2))
    d0 = tl.where(c, D4, 0.0)
    d1 = tl.where(c, D5, D1)
    d2 = tl.where(c, D6, D2)
    d3 = tl.where(c, D7, D3)
    c = ms > h1
    h = tl.where(c, h2, h0)
    e0 = tl.where(c, d2, d0)
    e1 = tl.where(c, d3, d1)
    return tl.where(ms > h, e1, e0)


@triton.jit
def _pairwise_last(v, LEAD: tl.constexpr, BB: tl.constexpr, N: tl.constexpr):
    """(LEAD, BB, N) -> (LEAD, BB): adjacent pairs summed, then pairs of pairs (N a power of two)."""
    for k in tl.static_range(N.bit_length() - 1):
        a, b = tl.split(tl.reshape(v, (LEAD, BB, N >> (k + 1), 2)))
        v = a + b
    return tl.reshape(v, (LEAD, BB))


@triton.jit
def _pairwise_sum(v, NCH: tl.constexpr, BB: tl.constexpr, W: tl.constexpr):
    """(NCH, BB, W) -> (BB,) in ``scale_search.pairwise_sum`` order over each block's NCH * W elements:
    within chunks first (adjacent pairs), then the chunk sums, adjacent pairs again."""
    v = _pairwise_last(v, NCH, BB, W)
    v = tl.reshape(tl.permute(v, (1, 0)), (1, BB, NCH))
    return tl.reshape(_pairwise_last(v, 1, BB, NCH), (BB,))


@triton.jit
def _tf32_head(a):
    """``a`` with the 13 fraction bits a TF32 multiply ignores cleared (``a - head`` is exact)."""
    return (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot3(a, b_big, b_small, PRECISION: tl.constexpr):
    """a @ b on the tensor cores to about fp32 accuracy: the 3xTF32 split (a = head + tail, exactly;
    the tail x tail product, ~2**-22 relative, is left out), accumulated in place. PRECISION "ieee"
    instead runs one fp32 FMA dot (b_big + b_small == b)."""
    if PRECISION == "ieee":
        return tl.dot(a, b_big + b_small, input_precision="ieee")
    a_big = _tf32_head(a)
    acc = tl.dot(a - a_big, b_big, input_precision="tf32")
    acc = tl.dot(a_big, b_small, acc, input_precision="tf32")
    return tl.dot(a_big, b_big, acc, input_precision="tf32")


@triton.jit
def _candidate(naive, step, gs, NVFP4: tl.constexpr):
    """Per-block candidate scale ``t`` (fp32) and its code (E4M3 bits or unbiased E8M0 exponent)."""
    if NVFP4:
        code = tl.minimum(tl.maximum(naive + step, 0), 0x7E)
        return e4m3_decode(code) * gs, code
    else:
        code = tl.minimum(tl.maximum(naive + step, -127), 127)
        # 2**code from its bits; 2**-127 is the subnormal with fraction bit 22
        return tl.where(code == -127, 0x400000, (code + 127) << 23).to(tl.float32, bitcast=True), code


# ---- the kernel ------------------------------------------------------------------------------------------------


@triton.jit
def _search_kernel(
    x_ptr, h_ptr, gs_ptr, q_ptr, scale_ptr, rows, cols,
    BLOCK: tl.constexpr, BB: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr,
    NVFP4: tl.constexpr, HESSIAN: tl.constexpr, STEP0: tl.constexpr, NSTEPS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    BP: tl.constexpr = NCH * W
    cb = tl.program_id(0)  # column block: neighbouring programs share rows, so writes merge in L2
    row = tl.program_id(1) * BB + tl.arange(0, BB)
    row_ok = row < rows
    j = tl.arange(0, NCH)[:, None, None] * W + tl.arange(0, W)[None, None, :]  # column within the block
    base = row.to(tl.int64) * cols + cb * BLOCK
    if BP == BLOCK:
        mask = tl.broadcast_to(row_ok[None, :, None], (NCH, BB, W))
    else:
        mask = row_ok[None, :, None] & (j < BLOCK)
    x = tl.load(x_ptr + (base[None, :, None] + j), mask=mask, other=0.0).to(tl.float32)
    mag = tl.abs(x)
    amax = tl.max(tl.max(mag, axis=2), axis=0)

    gs = 1.0
    if NVFP4:
        gs = tl.load(gs_ptr)
        block = tl.math.div_rn(tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)), tl.zeros_like(amax) + gs)
        naive = e4m3_encode(tl.minimum(block, 448.0))
    else:
        naive = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 2  # floor(log2(amax)) - emax

    # s: the power of two that brings the largest candidate scale into [1, 2) (clamped to stay a normal fp32)
    t_hi, _ = _candidate(naive, STEP0 + NSTEPS - 1, gs, NVFP4)
    exp_hi = tl.minimum((t_hi.to(tl.int32, bitcast=True) >> 23) & 0xFF, 253)
    s = ((254 - exp_hi) << 23).to(tl.float32, bitcast=True)
    ms = mag * _expand(s)

    if HESSIAN:
        hi = tl.arange(0, BP)
        h_offs = cb * (BLOCK * BLOCK) + hi[None, :] * BLOCK + hi[:, None]  # transposed: ht[j, i] = H_b[i, j]
        h_mask = (hi[None, :] < BLOCK) & (hi[:, None] < BLOCK)
        ht = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0)
        ht_big = _tf32_head(ht)
        ht_small = ht - ht_big

    best_err = tl.full((BB,), float("inf"), tl.float32)
    best_step = tl.zeros((BB,), tl.int32)  # the naive scale where no error is finite, as the reference
    for i in range(NSTEPS):
        t, _ = _candidate(naive, STEP0 + i, gs, NVFP4)
        d = _dequantized_magnitude(ms, t * s, t)
        if HESSIAN:
            # r = x - Q(x), Q(x) = d with the sign of x (a code of magnitude 0 decodes to +-0: same r)
            q = (d.to(tl.uint32, bitcast=True) | (x.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32, bitcast=True)
            r2 = tl.reshape(tl.permute(x - q, (1, 0, 2)), (BB, BP))
            v = _dot3(r2, ht_big, ht_small, PRECISION)
            err = tl.sum(r2 * v, axis=1)
        else:
            r = mag - d  # |x - Q(x)|
            err = _pairwise_sum(r * r, NCH, BB, W)
        better = err < best_err
        best_err = tl.where(better, err, best_err)
        best_step = tl.where(better, STEP0 + i, best_step)

    t, code = _candidate(naive, best_step, gs, NVFP4)
    idx = tl.where(_expand(t) == 0.0, 0, _encode_index(ms, t * s))  # scale 0: every code 0, as safe_div
    codes = tl.where((x < 0.0) & (idx > 0), idx + 8, idx)
    hi, lo = tl.split(tl.reshape(codes, (NCH, BB, W // 2, 2)))
    jq = tl.arange(0, NCH)[:, None, None] * (W // 2) + tl.arange(0, W // 2)[None, None, :]
    q_mask = row_ok[None, :, None] & (jq < BLOCK // 2)
    tl.store(q_ptr + ((base // 2)[None, :, None] + jq), ((hi << 4) | lo).to(tl.uint8), mask=q_mask)
    stored = code if NVFP4 else code + 127
    tl.store(scale_ptr + row.to(tl.int64) * (cols // BLOCK) + cb, stored.to(tl.uint8), mask=row_ok)


# ---- host side --------------------------------------------------------------------------------------------


def _tiling(block_size: int, elem_size: int, hessian: bool) -> tuple[int, int, int]:
    """(BB, NCH, W) for a block of ``block_size`` elements: W = one 16-byte vector of the input (at most the
    padded block), NCH chunks of it per block; narrow blocks one per thread, wide ones split over threads."""
    width = triton.next_power_of_2(block_size)
    if hessian:
        width = max(width, 16)  # tl.dot needs K, N >= 16
    w = min(width, max(2, 16 // elem_size))
    rows = SEARCH_ROWS if width <= 32 else max(1, SEARCH_TILE // width)
    return max(rows, 16) if hessian else rows, width // w, w


def _search(
    x: Tensor, block_size: int, global_scale: Tensor | None, hessian: Tensor | None, nvfp4: bool
) -> tuple[Tensor, Tensor] | None:
    check_2d(x, block_size)
    if block_size % 2:
        raise ValueError(f"4-bit codes pack in pairs: block_size {block_size} must be even")
    rows, cols = x.shape
    nb = cols // block_size
    if hessian is not None and tuple(hessian.shape) != (nb, block_size, block_size):
        raise ValueError(f"hessian must be ({nb}, {block_size}, {block_size}) diagonal blocks, got {tuple(hessian.shape)}")
    width = triton.next_power_of_2(block_size)
    if width > (MAX_WIDTH if hessian is None else HESSIAN_MAX_WIDTH):
        return None
    x = x.contiguous()
    q = torch.empty((rows, cols // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, nb), dtype=torch.uint8, device=x.device)
    if nvfp4:
        gs = global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
        steps = scale_search.NVFP4_STEPS
    else:
        gs = torch.ones(1, dtype=torch.float32, device=x.device)
        steps = scale_search.MXFP4_STEPS
    h = gs if hessian is None else hessian.to(device=x.device, dtype=torch.float32).contiguous()
    bb, nch, w = _tiling(block_size, x.element_size(), hessian is not None)
    if x.numel():
        _search_kernel[(nb * triton.cdiv(rows, bb),)](
            x, h, gs, q, scale, rows, cols,
            BLOCK=block_size, BB=bb, NCH=nch, W=w, NVFP4=nvfp4, HESSIAN=hessian is not None,
            STEP0=steps[0], NSTEPS=len(steps), PRECISION=HESSIAN_PRECISION,
            num_warps=4, enable_fp_fusion=False,
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
