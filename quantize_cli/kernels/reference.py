"""Pure-PyTorch reference quantizers: the definition of every format's numerics.

Every function takes a 2-D input ``x`` of shape (rows, cols) whose ``cols`` the block size divides
(callers pad), works in fp32 and is vectorised over blocks. The Triton kernels in
``quantize_cli.kernels.triton`` have the same signatures and must return the same codes and scales
bit for bit, so every rounding step here is spelled out: true fp32 division, round-half-to-even,
``bucketize`` with ties to the lower codebook value.

Layouts (the canonical on-disk packing):
- 4-bit codes: two per uint8, the first element of a pair in the high nibble (as bitsandbytes);
  ``qdata`` has shape (rows, cols // 2).
- 8-bit codes: one per byte, shape (rows, cols).
- scales: shape (rows, cols // block_size).
"""

from __future__ import annotations

import torch

from .constants import (
    E2M1_BOUNDS,
    E2M1_EMAX,
    E2M1_VALUES,
    E8M0_BIAS,
    F4_E2M1_MAX,
    F8_E4M3_MAX,
    codebook_search_tables,
)

Tensor = torch.Tensor


def pack_4bit(codes: Tensor) -> Tensor:
    """(rows, cols) uint8 codes in [0, 16) -> (rows, cols // 2) bytes, first code in the high nibble."""
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_4bit(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_4bit`: (rows, n) bytes -> (rows, 2 n) codes."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """(rows, cols) -> fp32 (rows, cols // block_size, block_size)."""
    rows, cols = x.shape
    return x.float().reshape(rows, cols // block_size, block_size)


def _round_half_even(v: Tensor) -> Tensor:
    return torch.round(v)  # torch.round rounds half to even, as rint does in the kernels


def _div(num: Tensor, den: float) -> Tensor:
    """num / den, an IEEE fp32 division on every device (CUDA would multiply by den's rounded reciprocal)."""
    return num / torch.full_like(num, den)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den is 0 (all-zero blocks must not produce NaN)."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


# ---- codebook formats: nf4, fp4 (bitsandbytes) and nf8 -------------------------------------------


def quantize_codebook(x: Tensor, block_size: int, codebook: Tensor, pack: bool) -> tuple[Tensor, Tensor]:
    """Absmax-scaled nearest-codebook quantization, bit-identical to bitsandbytes' quantize_4bit.

    Per block: ``absmax = max|x|``; ``v = clamp(x * (1 / absmax), -1, 1)``; the code is the index of
    the nearest codebook value, a tie going to the lower value. Returns (codes, absmax fp32).
    """
    xb = _blocks(x, block_size)
    absmax = xb.abs().amax(dim=-1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = torch.clamp(xb * inv.unsqueeze(-1), -1.0, 1.0)
    bounds, order = codebook_search_tables(codebook.to(device=x.device, dtype=torch.float32))
    codes = order[torch.bucketize(scaled, bounds)].reshape(x.shape)
    return (pack_4bit(codes) if pack else codes), absmax


def dequantize_codebook(
    qdata: Tensor, scale: Tensor, codebook: Tensor, block_size: int, packed: bool, dtype: torch.dtype
) -> Tensor:
    """codebook[code] * absmax in fp32, then cast to ``dtype``. Returns (rows, cols)."""
    codes = unpack_4bit(qdata) if packed else qdata
    values = codebook.to(device=qdata.device, dtype=torch.float32)[codes.long()]
    rows, cols = values.shape
    out = values.reshape(rows, cols // block_size, block_size) * scale.unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)


# ---- integer formats: int8 and int4 ----------------------------------------------------------------


def quantize_int(x: Tensor, block_size: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Linear integer quantization per block.

    Symmetric: ``s = absmax / qmax`` (qmax = 127 or 7), ``q = clamp(round(x / s), -qmax, qmax)``.
    Asymmetric (4-bit only): the range [min(x, 0), max(x, 0)] maps to [0, 15];
    ``s = (hi - lo) / 15``, ``zp = clamp(round(-lo / s), 0, 15)``, ``q = clamp(round(x / s) + zp, 0, 15)``.
    8-bit codes are int8; 4-bit codes are stored as unsigned nibbles (symmetric: q + 8) and packed.
    Returns (codes, scale fp32, zero_point uint8 or None).
    """
    xb = _blocks(x, block_size)
    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)
        scale = _div(xb.abs().amax(dim=-1), qmax)
        q = torch.clamp(_round_half_even(_safe_div(xb, scale.unsqueeze(-1))), -qmax, qmax)
        zero_point = None
        codes = q.to(torch.int8) if bits == 8 else (q + 8).to(torch.uint8)
    else:
        if bits != 4:
            raise ValueError("asymmetric quantization is defined for 4 bits only")
        lo = xb.amin(dim=-1).clamp(max=0.0)
        hi = xb.amax(dim=-1).clamp(min=0.0)
        scale = _div(hi - lo, 15.0)
        zp = torch.clamp(_round_half_even(_safe_div(-lo, scale)), 0.0, 15.0)
        q = torch.clamp(_round_half_even(_safe_div(xb, scale.unsqueeze(-1))) + zp.unsqueeze(-1), 0.0, 15.0)
        zero_point = zp.to(torch.uint8)
        codes = q.to(torch.uint8)
    codes = codes.reshape(x.shape)
    return (pack_4bit(codes) if bits == 4 else codes), scale, zero_point


def dequantize_int(
    qdata: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: int, bits: int, dtype: torch.dtype
) -> Tensor:
    """(q - zero) * s in fp32, cast to ``dtype``; the zero is 8 for symmetric 4-bit, 0 for int8."""
    if bits == 4:
        q = unpack_4bit(qdata).float()
        rows, cols = q.shape
        qb = q.reshape(rows, cols // block_size, block_size)
        zero = zero_point.float().unsqueeze(-1) if zero_point is not None else 8.0
        out = (qb - zero) * scale.unsqueeze(-1)
    else:
        rows, cols = qdata.shape
        out = qdata.float().reshape(rows, cols // block_size, block_size) * scale.unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)


# ---- fp8 (E4M3) --------------------------------------------------------------------------------------


def quantize_fp8(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """``s = absmax / 448`` per block; ``q = e4m3(clamp(x / s, -448, 448))`` (round to nearest even)."""
    xb = _blocks(x, block_size)
    scale = _div(xb.abs().amax(dim=-1), F8_E4M3_MAX)
    v = torch.clamp(_safe_div(xb, scale.unsqueeze(-1)), -F8_E4M3_MAX, F8_E4M3_MAX)
    return v.to(torch.float8_e4m3fn).reshape(x.shape), scale


def dequantize_fp8(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    rows, cols = qdata.shape
    out = qdata.float().reshape(rows, cols // block_size, block_size) * scale.unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)


# ---- E2M1 element encoding shared by NVFP4 and MXFP4 ----------------------------------------------------


def e2m1_encode(v: Tensor) -> Tensor:
    """fp32 values (already divided by their block scale) -> 4-bit E2M1 codes, saturating at +-6.

    Round to nearest, ties to even mantissa (see ``E2M1_BOUNDS``); bit 3 is the sign, set only for a
    non-zero magnitude so that a value that rounds to zero always gets code 0.
    """
    mag = v.abs()
    # Odd-index bounds (0.75, 1.75, 3.5) sit below an even mantissa, so their ties round up (>=);
    # even-index bounds (0.25, 1.25, 2.5, 5) round down (>).
    idx = torch.zeros_like(mag, dtype=torch.uint8)
    for i, bound in enumerate(E2M1_BOUNDS):
        idx += (mag >= bound if i % 2 else mag > bound).to(torch.uint8)
    sign = ((v < 0) & (idx > 0)).to(torch.uint8) << 3
    return sign | idx


def e2m1_decode(codes: Tensor) -> Tensor:
    """4-bit E2M1 codes -> fp32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


# ---- NVFP4: E2M1 elements, E4M3 scale per 16, fp32 per-tensor scale ------------------------------------


def nvfp4_global_scale(x: Tensor) -> Tensor:
    """Per-tensor decode scale ``amax / (448 * 6)`` (fp32, 0-d); 1 for an all-zero tensor."""
    amax = x.abs().amax().float()
    gs = _div(amax, F8_E4M3_MAX * F4_E2M1_MAX)
    return torch.where(gs == 0, torch.ones_like(gs), gs)


def quantize_nvfp4(x: Tensor, block_size: int, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """NVIDIA's two-level scaling.

    Block scale ``s = e4m3(clamp((amax_b / 6) / gs, max=448))`` (may round to an E4M3 subnormal or to
    0); element code ``e2m1(x / (s * gs))``, 0 for a block whose scale is 0.
    Returns (packed codes, block scales as float8_e4m3fn).
    """
    xb = _blocks(x, block_size)
    gs = global_scale.to(device=x.device, dtype=torch.float32)  # a CPU 0-d tensor would divide as a scalar
    block = torch.clamp(_div(xb.abs().amax(dim=-1), F4_E2M1_MAX) / gs, max=F8_E4M3_MAX)
    scale8 = block.to(torch.float8_e4m3fn)
    total = scale8.float() * gs
    codes = e2m1_encode(_safe_div(xb, total.unsqueeze(-1))).reshape(x.shape)
    return pack_4bit(codes), scale8


def dequantize_nvfp4(qdata: Tensor, scale: Tensor, global_scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    values = e2m1_decode(unpack_4bit(qdata))
    rows, cols = values.shape
    total = scale.float() * global_scale.float()
    out = values.reshape(rows, cols // block_size, block_size) * total.unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)


# ---- MXFP4: E2M1 elements, E8M0 (power of two) scale per 32 -------------------------------------------


def _floor_log2(a: Tensor) -> Tensor:
    """floor(log2(a)) for finite a >= 0, read from the fp32 exponent bits (exact; -127 for 0/subnormals)."""
    return ((a.float().view(torch.int32) >> 23) & 0xFF) - E8M0_BIAS


def quantize_mxfp4(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """OCP MX rule: shared exponent ``e = clamp(floor(log2(amax_b)) - 2, -127, 127)``;
    element code ``e2m1(x / 2**e)`` saturating at +-6. Returns (packed codes, biased E8M0 exponents
    as uint8, ``e + 127``)."""
    xb = _blocks(x, block_size)
    exp = torch.clamp(_floor_log2(xb.abs().amax(dim=-1)) - E2M1_EMAX, -E8M0_BIAS, E8M0_BIAS)
    scale = torch.exp2(exp.float())
    codes = e2m1_encode(xb / scale.unsqueeze(-1)).reshape(x.shape)
    return pack_4bit(codes), (exp + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    values = e2m1_decode(unpack_4bit(qdata))
    rows, cols = values.shape
    s = torch.exp2(scale.float() - E8M0_BIAS)
    out = values.reshape(rows, cols // block_size, block_size) * s.unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)
