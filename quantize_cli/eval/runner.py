"""``quanta eval`` as one function: perplexity, KL divergence from a baseline, per-tensor error metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import data as data_mod
from ..errors import QuantaError
from . import kld as kld_mod
from . import models
from .metrics import MetricsReport, tensor_metrics
from .perplexity import Perplexity, check_batch_size, perplexity

DEFAULT_DATA = "wikitext"
METRICS_WINDOWS = 8  # --metrics --data without --max-samples: activations of 8 windows are plenty


@dataclass
class EvalReport:
    """What one ``quanta eval`` run measured; ``as_dict`` is the ``--json`` payload."""

    model: str
    device: str
    data: str | None = None
    seq_len: int | None = None
    ppl: Perplexity | None = None
    baseline: str | None = None
    kld: kld_mod.KLDivergence | None = None
    metrics: MetricsReport | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "device": self.device}
        if self.ppl is not None:
            out.update(
                ppl=self.ppl.ppl,
                nll=self.ppl.nll,
                tokens=self.ppl.tokens,
                windows=self.ppl.windows,
                seq_len=self.seq_len,
                data=self.data,
            )
        if self.kld is not None:
            k = self.kld
            out.update(
                baseline=self.baseline,
                baseline_ppl=k.baseline_ppl,
                ppl_ratio=self.ppl.ppl / k.baseline_ppl if self.ppl else None,
                kld=k.mean,
                kld_median=k.median,
                kld_p99=k.p99,
                kld_max=k.max,
                top1_agreement=k.top1_agreement,
            )
        if self.metrics is not None:
            out["metrics"] = self.metrics.as_dict()
        return out


def _check(model: str, ppl: bool, kld: bool, metrics: bool, baseline: str | None) -> None:
    if not (ppl or kld or metrics):
        raise QuantaError("nothing to measure: pass --ppl, --kld (with --baseline MODEL) or --metrics")
    if kld and not baseline:
        raise QuantaError("--kld needs --baseline MODEL (the model to measure the divergence from)")
    if baseline and not kld:
        raise QuantaError("--baseline is used with --kld; add --kld")
    if metrics and not models.is_quanta_folder(model):
        raise QuantaError(f"--metrics needs a quanta folder; {model} has no quantization_map.json")


def evaluate(
    model: str,
    *,
    ppl: bool = False,
    kld: bool = False,
    metrics: bool = False,
    data: str | None = None,
    baseline: str | None = None,
    seq_len: int = 2048,
    max_samples: int | None = None,
    device: str = "auto",
    batch_size: int = 1,
    kld_top_k: int | None = None,
    cache_dir: Path | None = None,
    json_path: str | None = None,
) -> EvalReport:
    """Measure ``model`` (HF folder, hub id or quanta folder) as ``quanta eval`` does.

    Perplexity and KL use ``data`` (default wikitext, its test split) cut into ``seq_len`` windows;
    ``--metrics`` uses ``data`` (its calibration split) only when given, for the output error. With
    ``json_path`` the report is also written there (checked before any work starts).
    """
    _check(model, ppl, kld, metrics, baseline)
    if json_path is not None:
        _json_target(json_path)
    check_batch_size(batch_size)
    dev = models.resolve_device(device)
    report = EvalReport(model=model, device=str(dev), seq_len=seq_len)
    if ppl or kld:
        report.data = data_mod.describe(data or DEFAULT_DATA)
        tokenizer = models.load_tokenizer(model)
        windows = data_mod.token_windows(tokenizer, data or DEFAULT_DATA, seq_len, max_samples)
        if kld:
            _same_vocab(tokenizer, baseline)
            cache = kld_mod.baseline_cache(baseline, windows, batch_size, dev, kld_top_k, cache_dir)
            report.baseline = baseline
            lm = models.load_model(model, dev)
            report.ppl, report.kld = kld_mod.evaluate_against(lm, windows, cache, batch_size, dev)
        else:
            lm = models.load_model(model, dev)
            report.ppl = perplexity(lm, windows, batch_size, dev)
        del lm
        models.release_memory()
    if metrics:
        report.metrics = _metrics(model, data, seq_len, max_samples, dev)
    if json_path is not None:
        write_json(report.as_dict(), json_path)
    return report


def _same_vocab(tokenizer: Any, baseline: str | None) -> None:
    """KL compares distributions token by token: the baseline must share the model's vocabulary."""
    if models.load_tokenizer(str(baseline)).get_vocab() != tokenizer.get_vocab():
        raise QuantaError(f"the baseline {baseline} has another tokenizer; KL divergence needs the same vocabulary")


def _metrics(model: str, data: str | None, seq_len: int, max_samples: int | None, dev: torch.device) -> MetricsReport:
    if data is None:
        return tensor_metrics(model, device=dev)
    tokenizer = models.load_tokenizer(model)
    windows = data_mod.token_windows(tokenizer, data, seq_len, max_samples or METRICS_WINDOWS, "calibration")
    return tensor_metrics(model, windows, data_mod.describe(data, "calibration"), dev)


def _json_target(path: str) -> Path:
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise QuantaError(f"--json {path}: the folder {target.parent} does not exist")
    if target.is_dir():
        raise QuantaError(f"--json {path} is a folder")
    return target


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: an infinite SNR (a lossless tensor) or a missing value becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(payload: dict[str, Any], path: str) -> None:
    """Write ``payload`` as strict JSON atomically: a temp file next to ``path``, renamed into place."""
    target = _json_target(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(target)
