"""Per-tensor error of a quanta folder against its source weights (``quanta eval DIR --metrics``).

For each quantized ``W`` (read from the map's ``source`` one tensor at a time) and ``Q(W)`` (the stored
tensors dequantized): the weight error ||Q(W) - W|| / ||W|| (Frobenius), SNR = 20 log10(||W|| / ||Q(W) - W||)
dB, the max absolute error and, with calibration data, the output error ||X Q(W)^T - X W^T|| / ||X W^T||
where X are input rows of that Linear captured on the source model (a bounded random sample per Linear).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..api import dequantize
from ..errors import QuantaError
from ..format import tensors_to_state
from ..pipeline.source import Source, SourceReader, resolve_source
from ..reload import read_map, shard_index
from . import models
from .progress import progress_bar

WORST = 10


@dataclass
class TensorError:
    """Errors of one quantized tensor; ``output_error`` is None without calibration data."""

    name: str
    scheme: str
    shape: list[int]
    weight_error: float
    snr_db: float
    max_abs_error: float
    output_error: float | None = None


@dataclass
class MetricsReport:
    """Per-tensor errors of a quanta folder, with what they were measured on."""

    folder: str
    source: str
    tensors: list[TensorError]
    data: str | None = None
    rows: dict[str, int] = field(default_factory=dict)

    def by_scheme(self) -> dict[str, dict[str, Any]]:
        """Per scheme: tensor and parameter counts, mean weight error, mean SNR, max abs error, mean output error."""
        out: dict[str, dict[str, Any]] = {}
        for scheme in sorted({t.scheme for t in self.tensors}):
            ts = [t for t in self.tensors if t.scheme == scheme]
            outs = [t.output_error for t in ts if t.output_error is not None]
            out[scheme] = {
                "tensors": len(ts),
                "parameters": sum(math.prod(t.shape) for t in ts),
                "weight_error": sum(t.weight_error for t in ts) / len(ts),
                "snr_db": sum(t.snr_db for t in ts) / len(ts),
                "max_abs_error": max(t.max_abs_error for t in ts),
                "output_error": sum(outs) / len(outs) if outs else None,
            }
        return out

    def worst(self, n: int = WORST) -> list[TensorError]:
        """The ``n`` tensors with the largest output error (weight error where there is no data)."""
        return sorted(self.tensors, key=lambda t: _rank(t), reverse=True)[:n]

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "source": self.source,
            "data": self.data,
            "schemes": self.by_scheme(),
            "worst": [t.name for t in self.worst()],
            "tensors": [asdict(t) for t in self.tensors],
        }


def _rank(t: TensorError) -> float:
    return t.output_error if t.output_error is not None else t.weight_error


def weight_error(w: torch.Tensor, q: torch.Tensor) -> tuple[float, float, float]:
    """(||q - w|| / ||w||, SNR dB = 10 log10(sum w^2 / sum (q - w)^2), max |q - w|): fp32, sums in fp64."""
    w, q = w.float(), q.float()
    err = q - w
    signal, noise = float(w.square().sum(dtype=torch.float64)), float(err.square().sum(dtype=torch.float64))
    rel = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    snr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
    return rel, snr, float(err.abs().max())


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """||x q^T - x w^T|| / ||x w^T|| for input rows x (n, in) and weights (out, in), in fp32."""
    x = x.float()
    ref = x @ w.float().T
    diff = x @ (q.float() - w.float()).T  # one matmul of the difference: no cancellation of two large products
    denom = float(ref.norm())
    return float(diff.norm()) / denom if denom > 0 else math.inf


def source_of(qmap: dict[str, Any]) -> Source:
    """The source checkpoint the map names (a local path, or a hub id fetched into the HF cache)."""
    source = qmap.get("source")
    name = source.get("model") if isinstance(source, dict) else source
    if not name:
        raise QuantaError("quantization_map.json names no source model; --metrics needs the original weights")
    revision = source.get("revision") if isinstance(source, dict) and not Path(str(name)).exists() else None
    return resolve_source(str(name), revision)


@torch.inference_mode()
def capture_inputs(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    windows: torch.Tensor,
    device: torch.device,
    max_rows: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random sample of at most ``max_rows`` input rows of each module over ``windows``: name -> (rows, in).

    Forward pre-hooks keep ceil(max_rows / windows) random token positions per window, so memory is
    bounded by ``max_rows`` rows per Linear whatever the amount of data.
    """
    per_window = max(1, math.ceil(max_rows / windows.shape[0]))
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    pick: list[torch.Tensor] = []

    def hook(name: str):
        def fn(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            rows[name].append(x[pick[0].to(x.device)].cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        with progress_bar("capturing activations", windows.shape[0]) as advance:
            for i in range(windows.shape[0]):
                pick[:] = [torch.randperm(windows.shape[1], generator=gen)[:per_window]]
                model(input_ids=windows[i : i + 1].to(device), use_cache=False)
                advance(1)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(r)[:max_rows] for name, r in rows.items() if r}


def tensor_metrics(
    folder: str,
    windows: torch.Tensor | None = None,
    data_label: str | None = None,
    device: torch.device | str = "cpu",
    max_rows: int = 512,
) -> MetricsReport:
    """Errors of every quantized tensor of ``folder``; with ``windows`` (n, T) also the output error."""
    device = torch.device(device)
    path = Path(folder).expanduser()
    qmap = read_map(path)
    entries: dict[str, dict[str, Any]] = qmap["tensors"]
    source = source_of(qmap)
    missing = [n for n in entries if n not in source.tensors]
    if missing:
        raise QuantaError(f"the source {source.model} has no tensor {missing[0]} ({len(missing)} of the map's missing)")
    index = shard_index(path)
    inputs = _source_inputs(source, entries, windows, device, max_rows) if windows is not None else {}
    results = []
    with SourceReader(source) as reader, progress_bar("tensor errors", len(entries)) as advance:
        for name, entry in entries.items():
            w = reader.get(name).to(device)
            q = dequantize(tensors_to_state(name, entry, lambda k: _stored(index, k, device)))
            rel, snr, max_abs = weight_error(w, q)
            x = inputs.get(name)
            out = output_error(x.to(device), w, q) if x is not None else None
            results.append(TensorError(name, entry["scheme"], list(entry["shape"]), rel, snr, max_abs, out))
            advance(1)
    rows = {name: int(x.shape[0]) for name, x in inputs.items()}
    return MetricsReport(str(path), source.model, results, data_label, rows)


def _stored(index: dict[str, Path], key: str, device: torch.device) -> torch.Tensor | None:
    """A tensor of the quanta folder by its on-disk name, or None if it has none of that name."""
    if key not in index:
        return None
    with safe_open(index[key], framework="pt", device=str(device)) as f:
        return f.get_tensor(key)


def _source_inputs(
    source: Source,
    entries: dict[str, dict[str, Any]],
    windows: torch.Tensor,
    device: torch.device,
    max_rows: int,
) -> dict[str, torch.Tensor]:
    """Input rows of each quantized Linear, captured on the source model: weight name -> (rows, in)."""
    if source.root is None or not (source.root / "config.json").is_file():
        raise QuantaError(f"--data needs the source as a model folder with config.json; {source.model} is not one")
    model = models.load_model(str(source.root), device)
    linears = _linears_by_weight(model.named_modules(), entries)
    try:
        return capture_inputs(model, linears, windows, device, max_rows)
    finally:
        del model, linears
        models.release_memory()


def _linears_by_weight(named: Iterable[tuple[str, torch.nn.Module]], entries: dict[str, Any]) -> dict[str, Any]:
    """Linear modules whose ``<name>.weight`` is quantized in the map, keyed by that weight name."""
    return {f"{n}.weight": m for n, m in named if isinstance(m, torch.nn.Linear) and f"{n}.weight" in entries}
