"""The calibration statistics file: one safetensors file, written layer by layer, read lazily.

For a Linear ``L`` (module name, e.g. ``model.layers.0.mlp.down_proj``) it holds ``L.input_range``
(the observer's clipping range of |x|: (in_features,) per channel or (1,) per tensor, fp32) and, when
collected, ``L.input_hessian`` = X^T X / tokens, (in_features, in_features) fp32. Linears that read
the very same input (q/k/v, gate/up) share one Hessian: the file's metadata ``hessian_aliases`` maps
them to the Linear that holds it. The metadata also records the settings, data and sample counts.

Calibrated with smoothing (``smooth``), a smoothed Linear also has ``L.input_smooth`` (in_features,) fp32,
the SmoothQuant factors its input is divided by, and ``L.smoothed_input_range`` (1,) fp32, the observer's
range of that divided input; the metadata ``smoothing_groups`` lists every group with its chosen alpha
and the errors of the candidates tried.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import QuantaError
from ..pipeline.writer import ShardWriter, TensorSpec
from .layerwise import CalibrationSettings, LinearStats
from .observers import INT8_MAX

FORMAT = "quanta-calibration"
VERSION = "1"


def layer_tensors(prefix: str, stats: dict[str, LinearStats]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, Hessian aliases) for one decoder layer whose Linears' stats are ``stats``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, st in stats.items():
        linear = f"{prefix}.{name}"
        tensors[f"{linear}.input_range"] = st.observer.result().float().cpu().contiguous()
        chosen = st.smoothing.chosen if st.smoothing is not None else None
        if chosen is not None:
            # One copy per Linear of the group (safetensors refuses tensors that share memory).
            tensors[f"{linear}.input_smooth"] = chosen.factors.float().cpu().clone()
            tensors[f"{linear}.smoothed_input_range"] = chosen.input_range.float().cpu().reshape(1).clone()
        if st.shares_input_with is not None:
            aliases[linear] = f"{prefix}.{st.shares_input_with}"
        elif st.hessian is not None:
            tensors[f"{linear}.input_hessian"] = (st.hessian / st.tokens).float().cpu().contiguous()
    return tensors, aliases


class StatsWriter:
    """Collects per-layer statistics in a scratch folder, then streams them into one file atomically."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.scratch = Path(tempfile.mkdtemp(prefix=".quanta-calib-", dir=self.out.parent))
        self.parts: list[Path] = []
        self.aliases: dict[str, str] = {}
        self.smoothing: list[dict[str, Any]] = []

    def add_layer(self, index: int, prefix: str, stats: dict[str, LinearStats]) -> None:
        tensors, aliases = layer_tensors(prefix, stats)
        part = self.scratch / f"layer-{index:05d}.safetensors"
        save_file(tensors, str(part))
        self.parts.append(part)
        self.aliases.update(aliases)
        choices = {id(st.smoothing): st.smoothing for st in stats.values() if st.smoothing is not None}
        self.smoothing.extend(choice.record(prefix) for choice in choices.values())

    def finish(self, metadata: dict[str, Any]) -> Path:
        """Merge the parts into ``out`` one tensor at a time (memory: the largest tensor)."""
        specs: dict[str, TensorSpec] = {}
        for part in self.parts:
            with safe_open(str(part), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    specs[key] = TensorSpec(_dtype(sl.get_dtype()), tuple(sl.get_shape()))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "hessian_aliases": json.dumps(self.aliases),
            "smoothing_groups": json.dumps(self.smoothing),
        }
        meta.update({k: json.dumps(v) for k, v in metadata.items()})
        with ShardWriter(self.out, specs, meta) as writer:
            for part in self.parts:
                with safe_open(str(part), "pt") as f:
                    for key in f.keys():
                        writer.write(key, f.get_tensor(key))
        self.discard()
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}[name]


class CalibrationStats:
    """Read access to a statistics file; tensors are read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantaError(f"calibration file not found: {self.path}")
        try:
            self._file = safe_open(str(self.path), "pt")
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise QuantaError(f"corrupt calibration file {self.path}: {exc}") from None
        meta = self._file.metadata() or {}
        if meta.get("format") != FORMAT:
            raise QuantaError(f"{self.path} is not a quanta calibration file (run `quanta calibrate`)")
        self.metadata = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
        self.aliases: dict[str, str] = self.metadata.pop("hessian_aliases", {})
        # Files written before smoothing existed have no such key: nothing smoothed.
        self.smoothing_groups: list[dict[str, Any]] = self.metadata.pop("smoothing_groups", [])
        self._keys = set(self._file.keys())

    @property
    def linears(self) -> set[str]:
        return {k.removesuffix(".input_range") for k in self._keys if k.endswith(".input_range")}

    def input_range(self, linear: str) -> torch.Tensor | None:
        key = f"{linear}.input_range"
        return self._file.get_tensor(key) if key in self._keys else None

    def input_scale(self, linear: str, smoothed: bool = False) -> torch.Tensor | None:
        """The static symmetric int8 activation scale of ``linear`` (0-d fp32): per-tensor range / 127; with
        ``smoothed``, that of its input divided by :meth:`input_smooth` (when it has factors)."""
        key = f"{linear}.smoothed_input_range"
        r = self._file.get_tensor(key) if smoothed and key in self._keys else self.input_range(linear)
        return None if r is None else (r.max() / INT8_MAX).reshape(())

    def input_smooth(self, linear: str) -> torch.Tensor | None:
        """The SmoothQuant factors ``linear``'s input is divided by, (in_features,) fp32, or None."""
        key = f"{linear}.input_smooth"
        return self._file.get_tensor(key) if key in self._keys else None

    def hessian(self, linear: str) -> torch.Tensor | None:
        key = f"{self.aliases.get(linear, linear)}.input_hessian"
        return self._file.get_tensor(key) if key in self._keys else None


def settings_metadata(settings: CalibrationSettings, **extra: Any) -> dict[str, Any]:
    meta = asdict(settings)
    meta["dtype"] = str(settings.dtype).removeprefix("torch.")
    meta.update(extra)
    return meta
