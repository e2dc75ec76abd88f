"""SmoothQuant factors chosen during layer-wise calibration, while the layer and its inputs are resident.

After a layer's calibration pass every smoothing group (Linears reading one input) has a per-channel
histogram of that input. For each candidate alpha the factors ``s`` follow from the channel maxima and the
weights (:func:`quantize_cli.algorithms.smoothing_factors`), and the per-tensor range of ``x / s`` from the
histogram (:func:`scaled_range`, by the run's observer). ``smooth="auto"`` then measures each alpha of
``ALPHAS`` on the group's real inputs of the first ``smooth_samples`` windows (kept from the calibration
pass): the W8A8 output error per token ``||y_q - y||^2 / ||y||^2`` (int8-static: int8 weights per row, the
static int8 input scale ``range / 127``), averaged over the tokens and summed over the group's Linears.
The alpha with the least error wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..algorithms import AUTO, SmoothGroup, smoothing_factors
from ..api import dequantize, quantize
from ..nn.functional import fake_quantize_input
from .observers import INT8_MAX, HistogramObserver, scaled_range

Tensor = torch.Tensor

# The alpha grid of the automatic search (SmoothQuant uses 0.5 for most models, up to 0.75-0.85 for some).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The scheme whose numerics the search simulates: W8A8 with per-row int8 weights.
W8A8_SCHEME = "int8-static"


@dataclass
class Candidate:
    """One way to smooth a group's input: ``alpha``, its factors and the range of the smoothed input."""

    alpha: float
    factors: Tensor
    input_range: Tensor  # 0-d fp32: the clipping range of x / factors
    error: float = 0.0


@dataclass
class GroupChoice:
    """The candidate a group got, with the errors of every candidate tried (empty for a fixed alpha)."""

    group: SmoothGroup  # names relative to the layer
    chosen: Candidate
    errors: dict[str, float] = field(default_factory=dict)

    def record(self, prefix: str) -> dict[str, Any]:
        """The JSON record of the choice (full module names), for the statistics file and the map."""
        out = self.group.prefixed(prefix).to_dict()
        out["alpha"] = self.chosen.alpha
        out["errors"] = {k: round(v, 6) for k, v in self.errors.items()}
        return out


def group_weight_max(layer: nn.Module, group: SmoothGroup) -> Tensor:
    """max |W[:, j]| over every Linear of ``group``: (in_features,) fp32."""
    maxima = [layer.get_submodule(n).weight.detach().abs().amax(dim=0).float() for n in group.linears]
    return torch.stack(maxima).amax(dim=0)


def candidates(
    group: SmoothGroup,
    channels: HistogramObserver,
    weight_max: Tensor,
    smooth: str | float,
    observer: str,
    percentile: float,
) -> list[Candidate]:
    """The candidates for ``group``, whose input's per-channel histogram is ``channels``: the fixed alpha
    ``smooth``, or for ``auto`` every alpha of ``ALPHAS``; each with the range of its smoothed input by
    ``observer`` (minmax, percentile or histogram)."""
    alphas = ALPHAS if smooth == AUTO else (float(smooth),)
    act_max = channels.amax.to(weight_max.device)
    out = []
    for alpha in alphas:
        s = smoothing_factors(act_max, weight_max, alpha, group.heads)
        out.append(Candidate(alpha, s, scaled_range(channels, s, observer, percentile).float()))
    return out


def w8a8_error(samples: list[Tensor], weight: Tensor, candidate: Candidate) -> float:
    """The mean over the tokens of ``samples`` (each (tokens, in)) of ``||y_q - y||^2 / ||y||^2``, ``y`` the
    token's output through ``weight`` (out, in) and ``y_q`` the same run as int8-static after smoothing by
    ``candidate``: int8 weights per row, int8 inputs at the static scale.

    Per token, not over all tokens at once: a few tokens with massive activations (attention sinks) would
    otherwise decide alone, pulling alpha towards them at every other token's expense.
    """
    s = candidate.factors.to(weight.device)
    w_q = dequantize(quantize(weight * s, W8A8_SCHEME), dtype=torch.float32)
    step = (candidate.input_range / INT8_MAX).to(weight.device)
    total, tokens = 0.0, 0
    for x in samples:
        y = x @ weight.T
        err = (fake_quantize_input(x / s, step) @ w_q.T - y).pow(2).sum(dim=1)
        total += float((err / y.pow(2).sum(dim=1).clamp(min=1e-30)).sum())
        tokens += x.shape[0]
    return total / max(tokens, 1)


def choose(
    layer: nn.Module,
    groups: list[SmoothGroup],
    channels: dict[str, HistogramObserver],
    samples: dict[str, list[Tensor]],
    smooth: str | float,
    observer: str,
    percentile: float,
) -> list[GroupChoice]:
    """The smoothing of each group of ``layer``. ``channels[linear]`` is the input histogram and ``samples``
    the first input windows, (tokens, in_features) fp32, of one Linear of each group (they share the input)."""
    choices = []
    for group in groups:
        owner = next(n for n in group.linears if n in channels)
        cands = candidates(group, channels[owner], group_weight_max(layer, group), smooth, observer, percentile)
        if smooth != AUTO:
            choices.append(GroupChoice(group, cands[0]))
            continue
        weights = [layer.get_submodule(n).weight.detach().float() for n in group.linears]
        for cand in cands:
            cand.error = sum(w8a8_error(samples[owner], w, cand) for w in weights)
        errors = {f"{c.alpha:g}": c.error for c in cands}
        choices.append(GroupChoice(group, min(cands, key=lambda c: c.error), errors))
    return choices
