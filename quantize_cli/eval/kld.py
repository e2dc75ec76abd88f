"""KL divergence of a model's next-token distributions from a baseline's, through an on-disk baseline cache.

As llama.cpp's ``--kl-divergence``: per predicted token KL(P_base || P_eval) = sum_v p_base(v) (log p_base(v)
- log p_eval(v)), reported as mean, median, 99th percentile and max over every token, plus top-1 agreement
(how often both models' most likely next token is the same). The baseline's log-probabilities are computed
once per (baseline, windows) and stored as fp16 safetensors, one file per window, so the two models are never
resident together and later runs against the same baseline skip it.

Both sides go through the same fp16 rounding and renormalisation before the KL is taken, so a model
compared with itself gives exactly 0 and the rounding error (~1e-3 relative in a probability) acts alike on
both. With ``top_k`` only the baseline's k most likely tokens are stored; the rest of each distribution is
lumped into one "other" outcome, which gives a lower bound on the KL (the log-sum inequality) that is tight
when the baseline's tail mass is small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import QuantaError
from . import models
from .perplexity import Perplexity, token_nll, window_logprobs

CACHE_VERSION = 1
META_FILE = "meta.json"


@dataclass
class KLDivergence:
    """KL(P_base || P_eval) statistics over ``tokens`` predicted tokens, in nats; top-1 agreement in [0, 1]."""

    mean: float
    median: float
    p99: float
    max: float
    top1_agreement: float
    tokens: int
    baseline_ppl: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def cache_root() -> Path:
    """``$QUANTA_CACHE`` or ``$XDG_CACHE_HOME/quanta`` (default ``~/.cache/quanta``)."""
    env = os.environ.get("QUANTA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "quanta"


def cache_key(baseline: str, windows: torch.Tensor, top_k: int | None) -> str:
    """Hash of the baseline's identity, the exact token windows (so data, tokenizer and --seq-len) and top_k."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, models.fingerprint(baseline), top_k]).encode())
    h.update(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _window_file(folder: Path, i: int) -> Path:
    return folder / f"w{i:06d}.safetensors"


def _round(logprobs: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs -> the fp16 values stored on disk (both sides of the KL pass through this)."""
    return logprobs.clamp(min=torch.finfo(torch.float16).min).to(torch.float16)


def _renormalize(stored: torch.Tensor) -> torch.Tensor:
    """fp16 log-probs (..., V) -> fp32 log-probs of a distribution that sums to 1 again."""
    x = stored.float()
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def write_baseline(
    model: torch.nn.Module,
    windows: torch.Tensor,
    folder: Path,
    batch_size: int,
    device: torch.device,
    top_k: int | None = None,
) -> None:
    """One file per window: ``logprobs`` (T-1, V) fp16 or ``topk_logprobs``/``topk_ids`` (T-1, k); ``nll``, ``top1``."""
    for start, logprobs in window_logprobs(model, windows, batch_size, device, "baseline"):
        nll = token_nll(logprobs, windows[start : start + logprobs.shape[0]])
        for j in range(logprobs.shape[0]):
            lp = logprobs[j]
            if top_k is None:
                tensors = {"logprobs": _round(lp)}
            else:
                values, ids = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
                tensors = {"topk_logprobs": _round(values), "topk_ids": ids.to(torch.int32)}
            tensors["nll"] = nll[j].float()
            # Top-1 from the fp32 values: fp16 rounding (and topk's order among ties) would blur it.
            tensors["top1"] = lp.argmax(-1).to(torch.int32)
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, _window_file(folder, start + j))


def baseline_cache(
    baseline: str,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    top_k: int | None = None,
    root: Path | None = None,
) -> Path:
    """The cache folder of ``baseline`` on ``windows``, computing it first if missing.

    The baseline is loaded, run over every window and freed before this returns; the folder is built
    under a temporary name and renamed when complete, so an interrupted run leaves no partial cache.
    """
    if top_k is not None and top_k < 1:
        raise QuantaError(f"--kld-top-k must be at least 1, got {top_k}")
    root = root or cache_root()
    final = root / "kld" / cache_key(baseline, windows, top_k)
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    try:
        model = models.load_model(baseline, device)
        write_baseline(model, windows, staging, batch_size, device, top_k)
        del model  # freed before the evaluated model is loaded: the two are never resident together
        models.release_memory()
        meta = {"version": CACHE_VERSION, "baseline": baseline, "windows": list(windows.shape), "top_k": top_k}
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))
        if final.exists():  # an older incomplete folder without meta (or another process finished first)
            shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def token_kld(base: dict[str, torch.Tensor], logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_base || P_eval) and top-1 agreement for one window.

    ``base``: one cached window file; ``logprobs``: the evaluated model's fp32 log-probs (T-1, V).
    Returns (kl (T-1,) fp32, same_top1 (T-1,) bool).
    """
    same = base["top1"].to(logprobs.device).long() == logprobs.argmax(-1)
    if "logprobs" in base:
        if base["logprobs"].shape != logprobs.shape:
            raise QuantaError(
                f"the baseline's vocabulary ({base['logprobs'].shape[-1]}) differs from the model's "
                f"({logprobs.shape[-1]}); KL divergence needs the same tokenizer"
            )
        lp_base = _renormalize(base["logprobs"].to(logprobs.device))
        lp_eval = _renormalize(_round(logprobs))
        kl = (lp_base.exp() * (lp_base - lp_eval)).sum(-1)
        return kl.clamp(min=0), same
    ids = base["topk_ids"].to(logprobs.device).long()
    if int(ids.max()) >= logprobs.shape[-1]:
        raise QuantaError("the baseline's vocabulary differs from the model's; KL divergence needs the same tokenizer")
    p = base["topk_logprobs"].to(logprobs.device).float().exp()
    q = _round(logprobs.gather(-1, ids)).float().exp()
    # The "other" outcome: everything outside the baseline's top k.
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - q.sum(-1)).clamp(min=1e-12)
    kl = (p * (p.log() - q.log())).sum(-1) + torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest)
    return kl.clamp(min=0), same


def evaluate_against(
    model: torch.nn.Module,
    windows: torch.Tensor,
    cache: Path,
    batch_size: int,
    device: torch.device,
) -> tuple[Perplexity, KLDivergence]:
    """One pass of ``model`` over ``windows``: its perplexity and its KL from the cached baseline."""
    nll_sum, base_nll_sum = 0.0, 0.0
    kls: list[torch.Tensor] = []
    same = 0
    for start, logprobs in window_logprobs(model, windows, batch_size, device, "model"):
        nll = token_nll(logprobs, windows[start : start + logprobs.shape[0]])
        nll_sum += float(nll.double().sum())
        for j in range(logprobs.shape[0]):
            path = _window_file(cache, start + j)
            if not path.is_file():
                raise QuantaError(f"the baseline cache {cache} is incomplete ({path.name} is missing); delete it")
            base = load_file(path, device=str(logprobs.device))
            kl, agree = token_kld(base, logprobs[j])
            kls.append(kl.cpu())
            same += int(agree.sum())
            base_nll_sum += float(base["nll"].double().sum())
    n, seq_len = windows.shape
    tokens = n * (seq_len - 1)
    kl_all = torch.cat(kls).double().numpy()
    stats = KLDivergence(
        mean=float(kl_all.mean()),
        median=float(np.median(kl_all)),
        p99=float(np.percentile(kl_all, 99)),
        max=float(kl_all.max()),
        top1_agreement=same / tokens,
        tokens=tokens,
        baseline_ppl=Perplexity(base_nll_sum, tokens, n).ppl,
    )
    return Perplexity(nll_sum, tokens, n), stats
