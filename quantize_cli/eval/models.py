"""Loading what ``quanta eval`` measures: an original HF causal LM (folder or hub id) or a quanta folder."""

from __future__ import annotations

import gc
import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import QuantaError
from ..format import MAP_FILE

DEVICES = ("auto", "cpu", "cuda")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name", as the hub allows


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; ``cuda`` without a GPU is a clear error."""
    if device not in DEVICES:
        raise QuantaError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantaError("--device cuda: no CUDA device is available")
    return torch.device(device)


def is_quanta_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``quanta convert`` (it holds ``quantization_map.json``)."""
    return (Path(path).expanduser() / MAP_FILE).is_file()


def check_model(path: str) -> None:
    """A clear error for a path that does not exist and cannot be a hub id either."""
    if not Path(path).expanduser().exists() and not _REPO_ID.match(path):
        raise QuantaError(f"model not found: {path} (no such file or folder, and not a hub id)")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(path: str, device: torch.device) -> torch.nn.Module:
    """A causal LM in eval mode on ``device``, in its checkpoint dtype; quanta folders go through reload."""
    check_model(path)
    _quiet_transformers()
    if is_quanta_folder(path):
        from ..reload import load_quantized  # written alongside; imported only when a quanta folder is evaluated

        model = load_quantized(path, device=str(device), dtype=None)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise QuantaError(f"cannot load the model {path}: {_first_line(exc)}") from None
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str) -> Any:
    """The tokenizer stored with a model folder (a quanta folder carries its source's) or a hub id."""
    check_model(path)
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise QuantaError(f"cannot load the tokenizer of {path}: {_first_line(exc)}") from None


def release_memory() -> None:
    """Collect dropped models now and hand cached GPU memory back (call after ``del model``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fingerprint(path: str) -> str:
    """Identity of a model for cache keys: a local folder's files (name, size, mtime), else the hub id."""
    local = Path(path).expanduser()
    if not local.exists():
        return f"hub:{path}"
    files = [local] if local.is_file() else sorted(p for p in local.iterdir() if p.is_file())
    h = hashlib.sha256(str(local.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
