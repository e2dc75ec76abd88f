"""Format facts shared by the references and the Triton kernels.

Every table here is data, not code: the references and kernels read the same numbers, so their codes
agree bit for bit.
"""

from __future__ import annotations

from functools import cache

import torch

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): the 16 N(0,1) quantiles of QLoRA, sorted.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# bitsandbytes' FP4 table: code = sign bit (8) | 3-bit index, magnitudes of its E2M1 variant
# {0, 0.0625, 8, 12, 4, 6, 2, 3} normalised by 12. Not sorted, so quantizers search a sorted copy.
FP4_CODEBOOK: tuple[float, ...] = tuple(
    s * v / 12.0 + 0.0 for s in (1.0, -1.0) for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
)  # "+ 0.0" turns code 8 into +0.0, as in bitsandbytes' table

# OCP / NVIDIA E2M1: magnitude index 0..7 -> value; bit 3 of the code is the sign.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
F4_E2M1_MAX = 6.0
F8_E4M3_MAX = 448.0
# E2M1 decision thresholds with round-half-to-even: a magnitude equal to an odd entry rounds up,
# equal to an even entry rounds down (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
E2M1_BOUNDS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# MXFP4 (OCP MX v1.0): shared exponent = floor(log2(amax)) - emax(E2M1) where emax = 2.
E2M1_EMAX = 2
E8M0_BIAS = 127

NF8_OFFSET = 0.9677083


@cache
def nf8_codebook() -> tuple[float, ...]:
    """NF4's construction at 8 bits: 128 positive and 127 negative N(0,1) quantiles plus an exact 0.

    Quantile probabilities run linearly from ``NF8_OFFSET`` towards 0.5 (exclusive), as QLoRA does
    for NF4; the values are scaled so the extremes are exactly +-1, then sorted.
    """
    pos = torch.special.ndtri(torch.linspace(NF8_OFFSET, 0.5, 129, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF8_OFFSET, 0.5, 128, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    values = (values / values.abs().max()).sort().values
    return tuple(values.to(torch.float32).tolist())


def codebook_tensor(values: tuple[float, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """A codebook as an fp32 tensor on ``device``."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def codebook_search_tables(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted-midpoint boundaries and the sorted-position -> code map for nearest-value search.

    A scaled value v gets sorted position ``bucketize(v, bounds)`` (a tie goes to the lower value,
    as bitsandbytes does), then code ``order[position]``. Midpoints are computed in fp32.
    """
    order = torch.argsort(codebook, stable=True)  # tied values (fp4's two zeros) in code order on every device
    s = codebook[order]
    bounds = (s[:-1] + s[1:]) / 2
    return bounds, order.to(torch.uint8)
