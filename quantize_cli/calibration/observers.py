"""Activation-range observers: each sees (tokens, channels) inputs and returns a clipping range.

``result()`` is the absolute clipping value per channel, shape (channels,), or (1,) per tensor. A
symmetric int8 activation scale is ``range / 127``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

OBSERVERS = ("minmax", "percentile", "histogram")
INT8_MAX = 127.0

# Histogram bins are log2-spaced: BINS_PER_OCTAVE per octave over [2^LOG2_LO, 2^LOG2_HI), so the range
# never has to be re-binned as larger activations arrive; 1/16 octave is a 4.4 % step in the clip.
BINS_PER_OCTAVE = 16
LOG2_LO, LOG2_HI = -24, 24
N_BINS = (LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE
# The MSE search tries clips from the largest activation down this many octaves.
SEARCH_OCTAVES = 6


def _reduce_dims(x: Tensor, per_channel: bool) -> Tensor:
    """|x| as (tokens, channels) for per-channel statistics, or (tokens * channels, 1) per tensor."""
    a = x.detach().abs().float().reshape(-1, x.shape[-1])
    return a if per_channel else a.reshape(-1, 1)


@dataclass
class MinMaxObserver:
    """The largest |x| seen."""

    per_channel: bool = False
    amax: Tensor | None = None

    def update(self, x: Tensor) -> None:
        a = _reduce_dims(x, self.per_channel).amax(dim=0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)

    def result(self) -> Tensor:
        return self.amax


@dataclass
class PercentileObserver:
    """The mean over batches of each batch's ``percentile``-th percentile of |x| (robust to outliers)."""

    per_channel: bool = False
    percentile: float = 99.99
    total: Tensor | None = None
    batches: int = 0

    def update(self, x: Tensor) -> None:
        a = _reduce_dims(x, self.per_channel)
        k = max(1, min(a.shape[0], math.ceil(self.percentile / 100.0 * a.shape[0])))
        q = torch.kthvalue(a, k, dim=0).values  # torch.quantile refuses inputs over 16M elements
        self.total = q if self.total is None else self.total + q
        self.batches += 1

    def result(self) -> Tensor:
        return self.total / self.batches


@dataclass
class HistogramObserver:
    """A log2-binned histogram of |x|; the result is the clip that minimises the expected int8 MSE.

    For a clip c the expected squared error is, over every observed value v (taken at its bin's
    geometric centre): (v - c)^2 if v > c (clipping), else step^2 / 12 with step = c / 127 (rounding).
    """

    per_channel: bool = False
    counts: Tensor | None = None
    amax: Tensor | None = None
    _edges: Tensor = field(default_factory=lambda: torch.exp2(torch.arange(N_BINS + 1) / BINS_PER_OCTAVE + LOG2_LO))

    def update(self, x: Tensor) -> None:
        a = _reduce_dims(x, self.per_channel)
        channels = a.shape[1]
        log = torch.log2(a.clamp(min=2.0**LOG2_LO))
        idx = ((log - LOG2_LO) * BINS_PER_OCTAVE).floor().clamp(0, N_BINS - 1).long()
        flat = (idx + torch.arange(channels, device=a.device) * N_BINS).reshape(-1).cpu()
        if self.counts is None:
            self.counts = torch.zeros(channels, N_BINS, dtype=torch.int64)
        # index_add_ into the running counts: no (channels x bins) temporary per batch.
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        am = a.amax(dim=0).cpu()
        self.amax = am if self.amax is None else torch.maximum(self.amax, am)

    def result(self) -> Tensor:
        """Per channel, the clip among {amax} and the bin edges within ``SEARCH_OCTAVES`` below it with the least
        expected MSE. With suffix sums over bins the search is O(channels x bins)."""
        edges = self._edges.double()
        centres = torch.sqrt(edges[:-1] * edges[1:])  # (bins,)
        counts = self.counts.double()  # (channels, bins)
        # Sums over the bins strictly above bin k: count, count * v, count * v^2.
        s0, s1, s2 = (_suffix_above(counts * centres**p) for p in (0, 1, 2))
        total = counts.sum(dim=1, keepdim=True)
        clip = edges[1:].expand_as(counts)  # clip at the upper edge of bin k
        step_err = (clip / INT8_MAX) ** 2 / 12.0
        mse = s2 - 2 * clip * s1 + clip**2 * s0 + step_err * (total - s0)
        amax = self.amax.double().unsqueeze(1)
        allowed = (clip <= amax) & (clip >= amax * 2.0**-SEARCH_OCTAVES)
        mse = torch.where(allowed, mse, torch.full_like(mse, float("inf")))
        best_mse, best_k = mse.min(dim=1)
        no_clip_mse = ((amax / INT8_MAX) ** 2 / 12.0 * total).squeeze(1)
        best = torch.where(best_mse < no_clip_mse, clip.gather(1, best_k.unsqueeze(1)).squeeze(1), amax.squeeze(1))
        return best.float()


def scaled_range(channels: HistogramObserver, divisor: Tensor, kind: str, percentile: float = 99.99) -> Tensor:
    """The per-tensor clipping range (0-d fp32) of ``x / divisor`` by observer ``kind``, from a per-channel
    histogram of ``x`` (``channels``: ``HistogramObserver(per_channel=True)``), without seeing ``x`` again.

    Dividing channel j by ``divisor[j]`` moves its log2 bins by ``-log2(divisor[j])`` octaves; the shift is
    rounded to whole bins (1/16 octave), so bin counts are exact to within one bin. ``minmax`` is exact
    (``max_j amax_j / divisor_j``); ``percentile`` is the percentile of all values pooled (not the batch mean
    of :class:`PercentileObserver`), at a bin's upper edge; ``histogram`` is the MSE-optimal clip.
    """
    d = divisor.float().cpu()
    amax = (channels.amax / d).amax().reshape(1)
    if kind == "minmax":
        return amax[0]
    shift = torch.round(-torch.log2(d) * BINS_PER_OCTAVE).long()
    bins = (torch.arange(N_BINS).unsqueeze(0) + shift.unsqueeze(1)).clamp(0, N_BINS - 1)
    pooled = HistogramObserver(per_channel=False, amax=amax)
    pooled.counts = torch.zeros(1, N_BINS, dtype=torch.int64)
    pooled.counts.view(-1).index_add_(0, bins.reshape(-1), channels.counts.reshape(-1))
    if kind == "histogram":
        return pooled.result()[0]
    if kind == "percentile":
        cumulative = pooled.counts[0].cumsum(0).double()
        k = int(torch.searchsorted(cumulative, cumulative[-1] * percentile / 100.0))
        return torch.minimum(pooled._edges[min(k + 1, N_BINS)].float(), amax[0])
    raise ValueError(f"unknown observer {kind!r}; valid: {', '.join(OBSERVERS)}")


def _suffix_above(x: Tensor) -> Tensor:
    """out[..., k] = sum of x[..., j] for j > k."""
    return x.flip(-1).cumsum(-1).flip(-1) - x


def make_observer(
    kind: str, per_channel: bool, percentile: float = 99.99
) -> MinMaxObserver | PercentileObserver | HistogramObserver:
    """An observer by name (``minmax``, ``percentile``, ``histogram``)."""
    if kind == "minmax":
        return MinMaxObserver(per_channel)
    if kind == "percentile":
        return PercentileObserver(per_channel, percentile)
    if kind == "histogram":
        return HistogramObserver(per_channel)
    raise ValueError(f"unknown observer {kind!r}; valid: {', '.join(OBSERVERS)}")
