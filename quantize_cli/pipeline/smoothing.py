"""SmoothQuant folding in the streaming converter: per-tensor scalings decided from the statistics up front.

Calibration (``smooth``) chose, per group of Linears reading one input, factors ``s`` (``L.input_smooth``) and
the range of ``x / s``. Before any tensor is streamed, :func:`plan_smoothing` turns the groups into a map
from checkpoint tensor name to :class:`~quantize_cli.algorithms.ChannelScale`; the converter then scales each
tensor as it passes (a norm weight divided, a weight's columns multiplied, a producer's rows divided) and
writes the smoothed input scale. The model computes the same function in float; only its quantization
changes. A group is folded only when every Linear in it gets a static-activation (W8A8) scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..algorithms import AUTO, LLAMA_LIKE, ChannelScale, SmoothGroup, fold_scales, parse_smooth
from ..errors import QuantaError
from ..schemes import get_scheme
from .plan import Plan, linear_name

Tensor = torch.Tensor


@dataclass
class Smoothing:
    """What a conversion folds: tensor name -> scaling, smoothed Linear -> its alpha, and the map's record."""

    scales: dict[str, ChannelScale] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def apply(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (the checkpoint's ``name``) scaled and cast back to its dtype; unchanged if not folded."""
        scale = self.scales.get(name)
        if scale is None:
            return tensor
        out = scale.apply(tensor).to(tensor.dtype)
        if not bool(torch.isfinite(out).all()):
            raise QuantaError(
                f"smoothing {name} overflows {str(tensor.dtype).removeprefix('torch.')}; convert with --smooth off"
            )
        return out


def static_linears(plan: Plan) -> set[str]:
    """Module names of the Linears the plan gives a static-activation (calibrated W8A8) scheme."""
    return {linear_name(tp.name) for tp in plan.quantized if get_scheme(tp.target.scheme).needs_calibration}


def plan_smoothing(plan: Plan, stats: Any, smooth: str | float | None, log: Callable[[str], None]) -> Smoothing | None:
    """The folding for ``plan`` from ``stats`` (CalibrationStats), or None: smoothing off, no W8A8 Linear, or
    a file without smoothing factors (a warning then). A fixed ``smooth`` alpha must be the file's."""
    smooth = parse_smooth(smooth)
    static = static_linears(plan)
    if smooth is None or stats is None or not static:
        return None
    used = stats.metadata.get("smooth")
    if smooth != AUTO and used != smooth:
        raise QuantaError(
            f"calibration file {stats.path} was made with smooth={used}, not {smooth}: calibrate again with "
            f"--smooth {smooth}, or convert with --smooth auto to use the file's"
        )
    if not stats.smoothing_groups:
        known = ", ".join(LLAMA_LIKE)
        why = "calibrated without --smooth" if used is None else f"smoothing knows the layers of {known}"
        log(f"{stats.path} holds no smoothing factors ({why}): W8A8 without SmoothQuant smoothing")
        return None
    folded: list[tuple[SmoothGroup, Tensor]] = []
    records = []
    for rec in stats.smoothing_groups:
        group = SmoothGroup.from_dict(rec)
        if not static.issuperset(group.linears):
            continue
        _check_present(plan, group)
        folded.append((group, stats.input_smooth(group.linears[0])))
        records.append({k: rec[k] for k in ("linears", "source", "kind", "heads", "alpha")})
    record = {"method": "smoothquant", "smooth": used, "observer": stats.metadata.get("observer"), "groups": records}
    alphas = {linear: rec["alpha"] for rec in records for linear in rec["linears"]}
    return Smoothing(fold_scales(folded), alphas, record)


def _check_present(plan: Plan, group: SmoothGroup) -> None:
    for name in (*(f"{n}.weight" for n in group.linears), f"{group.source}.weight"):
        if name not in plan.tensors:
            raise QuantaError(f"smoothing folds into {name}, which the checkpoint does not have")
