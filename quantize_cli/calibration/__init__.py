"""Layer-wise calibration: activation ranges and X^T X per Linear, for calibrated schemes and methods."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import QuantaError
from .layerwise import CalibrationSettings, LayerwiseRun
from .observers import OBSERVERS
from .stats import CalibrationStats, StatsWriter, settings_metadata

__all__ = ["OBSERVERS", "CalibrationSettings", "CalibrationStats", "calibrate", "pick_device"]


def pick_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise QuantaError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantaError("--device cuda was asked for but no CUDA device is available")
    return device


def calibration_windows(source_root: Path, data: str, samples: int, seq_len: int) -> torch.Tensor:
    """The first ``samples`` consecutive windows of ``seq_len`` tokens of ``data``'s calibration split."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import

    from ..data import token_windows  # noqa: PLC0415

    if samples < 1:
        raise QuantaError(f"--samples must be at least 1, got {samples}")
    tokenizer = AutoTokenizer.from_pretrained(str(source_root))
    return token_windows(tokenizer, data, seq_len, max_samples=samples, purpose="calibration")


def calibrate(
    model: str,
    data: str,
    out: str | Path = "calib.safetensors",
    samples: int = 128,
    seq_len: int = 512,
    settings: CalibrationSettings | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Calibrate ``model`` on ``data`` one decoder layer at a time and write the statistics to ``out``."""
    from ..pipeline.source import resolve_source  # noqa: PLC0415

    settings = settings or CalibrationSettings()
    if settings.observer not in OBSERVERS:
        raise QuantaError(f"unknown observer {settings.observer!r}; valid: {', '.join(OBSERVERS)}")
    settings.device = pick_device(settings.device)
    out = Path(out)
    if out.exists() and not overwrite:
        raise QuantaError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise QuantaError(f"folder of {out} does not exist")
    source = resolve_source(model, revision)
    if source.root is None:
        raise QuantaError("calibration needs a model folder with config.json and a tokenizer")
    windows = calibration_windows(source.root, data, samples, seq_len)
    writer = StatsWriter(out)
    try:
        with _progress(show_progress) as bar:
            task = bar.add_task("calibrating", total=None)
            LayerwiseRun(source, settings).run(
                windows, writer.add_layer, lambda done, total: bar.update(task, completed=done, total=total)
            )
        meta = settings_metadata(settings, model=model, data=data, samples=int(windows.shape[0]), seq_len=seq_len)
        return writer.finish(meta)
    finally:
        writer.discard()


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layers"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
