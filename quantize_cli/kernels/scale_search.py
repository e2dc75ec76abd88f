"""Reference block-scale searches for NVFP4 and MXFP4: SSE-optimal and Hessian-optimal scales.

The naive scale snaps ``amax / 6`` to the scale format. A smaller scale clips the block's largest
element but resolves the rest more finely; a larger one does the opposite. These searches try a
bounded set of neighbouring scales on the format's own grid and keep, per block, the one with the
least error: the squared error ``r.r`` (SSE) or ``r^T H_b r`` (Hessian), with ``r = x - Q(x)`` and
``H_b`` the block's diagonal block of the calibration ``X^T X``. Cross-block terms of H are ignored, so
blocks are independent and the search stays one pass over the weight.

Each candidate scale ``t`` encodes ``x * (1 / t)``, its reciprocal rounded once per block (``reciprocal``),
rather than ``x / t`` as the naive quantizers do: the two differ only for a value within an ulp of an
E2M1 decision bound, and a multiply keeps the Triton search (every candidate encodes every element) cheap.
The chosen scale's codes are encoded the same way, so the stored state is the one whose error won.

SSE ranks the candidates by their squared error evaluated in fp16 (``sse_fp16``), the arithmetic the
Triton search runs two elements per instruction. The kept scales lose almost nothing against an exact
ranking (tests/test_scale_search.py: under 1e-4 of the total squared error on heavy-tailed weights); on
SmolLM2's weights the total differs from an fp32 ranking's by 1e-5.

Same input conventions as ``reference.py``: 2-D ``x`` whose cols the block divides. ``hessian`` is
None (SSE) or (cols // block_size, block_size, block_size) fp32 diagonal blocks.
"""

from __future__ import annotations

import torch

from .constants import E2M1_EMAX, E8M0_BIAS, F4_E2M1_MAX, F8_E4M3_MAX
from .reference import _blocks, _div, _floor_log2, _safe_div, e2m1_decode, e2m1_encode, pack_4bit

Tensor = torch.Tensor

# Candidate scales, in steps of the scale format's grid around the naive scale. E4M3 has 8 steps per
# octave, so +6 is about 1.75x amax / 6. The upper side pays off often: a larger scale that puts the
# block's outlier between grid points can serve its other values better. Which step wins is bimodal
# (-1..+1 and +3..+6 on real weights; +2 and -2 rarely), so the sets skip steps: each candidate costs
# its share of the search time, and a step was kept only where dropping it showed in the errors of
# benchmarks/calibrated_methods.py (benchmarks/results.md has the sets tried). The Hessian search costs
# more per candidate (a tensor-core product and an fp32 reduction each) and keeps five, those a greedy
# removal from -7..+8 leaves (the best of the five-step sets tried): on SmolLM2 its output error is 25 %
# below naive against 29 % with nine (-7, -2, -1, 0, 1, 3, 4, 5, 6), in 2.7-2.8x the time of a plain
# quantize against 3.8x. Ascending: the first wins a tie. E8M0 steps are octaves.
NVFP4_STEPS: tuple[int, ...] = (-1, 0, 1, 3, 4, 5, 6)
NVFP4_HESSIAN_STEPS: tuple[int, ...] = (-2, -1, 0, 4, 5)
MXFP4_STEPS: tuple[int, ...] = (-1, 0, 1)
_E4M3_MAX_BITS = 0x7E  # 448; 0x7F is NaN
FLT_MAX = float(torch.finfo(torch.float32).max)
HALF_MAX = float(torch.finfo(torch.float16).max)


def hessian_blocks(hessian: Tensor, block_size: int) -> Tensor:
    """(cols, cols) X^T X -> its (cols // block_size, block_size, block_size) diagonal blocks, fp32."""
    nb = hessian.shape[0] // block_size
    h = hessian.float().reshape(nb, block_size, nb, block_size)
    idx = torch.arange(nb, device=hessian.device)
    return h[idx, :, idx, :]


def halving_sum(v: Tensor) -> Tensor:
    """Sum over the last dimension in a fixed order: zero-padded to a power of two, then the second half
    added to the first, and again, down to one element. The Triton search sums its squared errors in this
    order (each step is one packed fp16 add of pairs), so both round the same way."""
    width = v.shape[-1]
    pad = (1 << max(width - 1, 0).bit_length()) - width
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


def normaliser(amax: Tensor) -> tuple[Tensor, Tensor]:
    """Per-block power of two ``p = 2**-e`` and ``1 / p``, e = floor(log2(amax)) clamped to [-126, 126]
    (both normal fp32): ``|x| * p`` lies below 2, in fp16's range."""
    e = torch.clamp(((amax.float().view(torch.int32) >> 23) & 0xFF) - 127, -126, 126)
    return ((127 - e) << 23).view(torch.float32), ((127 + e) << 23).view(torch.float32)


def _fp16_grid(xb: Tensor, total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ranking's fp16 operands for blocks ``xb`` (rows, nb, B) under per-block scales ``total``:
    ``z = |x| * p`` (``normaliser``), the E2M1 magnitudes ``q = e2m1(z * rho)`` with ``rho = reciprocal(t) / p``,
    and ``sigma = t * p`` (rho and sigma rounded to fp16, at most 65504)."""
    mag = xb.abs()
    p, p_inv = normaliser(mag.amax(dim=-1))
    z = (mag * p.unsqueeze(-1)).half()
    rho = torch.clamp(reciprocal(total) * p_inv, max=HALF_MAX).half().unsqueeze(-1)
    sigma = torch.clamp(total * p, max=HALF_MAX).half().unsqueeze(-1)
    y = (z * rho).float()  # exact: every fp16 value is an fp32 value
    return z, e2m1_decode(e2m1_encode(y)).half(), sigma


def sse_fp16(xb: Tensor, total: Tensor) -> Tensor:
    """Squared error of blocks ``xb`` (rows, nb, B) under per-block scales ``total``, evaluated in fp16 as
    the Triton search does with packed fp16 arithmetic (twice the fp32 rate): ``r = z - q * sigma``
    (``_fp16_grid``), then ``halving_sum(r * r)`` in fp16. Only which candidate wins is taken from it: the
    stored codes are encoded in fp32, as the naive quantizers do. Every step is one fp16 operation, and
    PyTorch rounds those as the GPU does, so reference and kernel pick the same scales."""
    z, q, sigma = _fp16_grid(xb, total)
    r = z - q * sigma
    return halving_sum(r * r)


def hessian_fp16(xb: Tensor, total: Tensor, hessian: Tensor) -> Tensor:
    """Per-block error r^T H_b r of blocks ``xb`` under per-block scales ``total``, with the codes of the SSE
    ranking (``_fp16_grid``: computed in packed fp16 on the GPU), r = x - sign(x) q t."""
    _, q, _ = _fp16_grid(xb, total)
    return hessian_error(xb, torch.copysign(q.float(), xb) * total.unsqueeze(-1), hessian)


def hessian_error(xb: Tensor, dq: Tensor, hessian: Tensor) -> Tensor:
    """Per-block error r^T H_b r of (rows, nb, B) values, r = xb - dq."""
    r = xb - dq
    return torch.einsum("rbi,bij,rbj->rb", r, hessian, r)


def reciprocal(total: Tensor) -> Tensor:
    """1 / total rounded once (a true division), at most FLT_MAX where total is tiny (so x * it is never
    NaN), 0 where total is 0 (every code 0, as ``safe_div``)."""
    return torch.clamp(_safe_div(torch.ones_like(total), total), max=FLT_MAX)


def _e2m1_roundtrip(xb: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and dequantized values of blocks ``xb`` (rows, nb, B) under per-block scales ``total``:
    ``e2m1(x * reciprocal(t))``, dequantized ``decode(code) * t``."""
    codes = e2m1_encode(xb * reciprocal(total).unsqueeze(-1))
    return codes, e2m1_decode(codes) * total.unsqueeze(-1)


def _candidate_error(xb: Tensor, total: Tensor, hessian: Tensor | None) -> Tensor:
    """One candidate's per-block error: ``sse_fp16`` or ``hessian_fp16``."""
    if hessian is None:
        return sse_fp16(xb, total)
    return hessian_fp16(xb, total, hessian)


def search_nvfp4(x: Tensor, block_size: int, global_scale: Tensor, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    """NVFP4 with searched E4M3 block scales. Returns (packed codes, float8_e4m3fn scales) like
    ``reference.quantize_nvfp4``; the first candidate wins a tie, so the steps' order matters."""
    xb = _blocks(x, block_size)
    gs = global_scale.to(device=x.device, dtype=torch.float32)  # a CPU 0-d tensor would divide as a scalar
    # the naive scale exactly as reference.quantize_nvfp4 computes it (true divisions on every device)
    naive = torch.clamp(_div(xb.abs().amax(dim=-1), F4_E2M1_MAX) / gs, max=F8_E4M3_MAX).to(torch.float8_e4m3fn)
    naive_bits = naive.view(torch.uint8).to(torch.int32)
    best_err = torch.full(naive.shape, float("inf"), device=x.device)
    best_bits = naive_bits.clone()
    for step in NVFP4_STEPS if hessian is None else NVFP4_HESSIAN_STEPS:
        bits = torch.clamp(naive_bits + step, 0, _E4M3_MAX_BITS)
        scale = bits.to(torch.uint8).view(torch.float8_e4m3fn).float()
        err = _candidate_error(xb, scale * gs, hessian)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_bits = torch.where(better, bits, best_bits)
    scale8 = best_bits.to(torch.uint8).view(torch.float8_e4m3fn)
    codes, _ = _e2m1_roundtrip(xb, scale8.float() * gs)
    return pack_4bit(codes.reshape(x.shape)), scale8


def search_mxfp4(x: Tensor, block_size: int, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    """MXFP4 with searched E8M0 exponents. Returns (packed codes, uint8 biased exponents) like
    ``reference.quantize_mxfp4``."""
    xb = _blocks(x, block_size)
    naive = _floor_log2(xb.abs().amax(dim=-1)) - E2M1_EMAX
    best_err = torch.full(naive.shape, float("inf"), device=x.device)
    best_exp = torch.clamp(naive, -E8M0_BIAS, E8M0_BIAS)
    for step in MXFP4_STEPS:
        exp = torch.clamp(naive + step, -E8M0_BIAS, E8M0_BIAS)
        err = _candidate_error(xb, torch.exp2(exp.float()), hessian)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_exp = torch.where(better, exp, best_exp)
    codes, _ = _e2m1_roundtrip(xb, torch.exp2(best_exp.float()))
    return pack_4bit(codes.reshape(x.shape)), (best_exp + E8M0_BIAS).to(torch.uint8)
