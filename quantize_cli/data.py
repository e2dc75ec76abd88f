"""Text data for evaluation and calibration: named sets from the hub, or local files, through ``datasets``.

``--data`` is a name in ``NAMED`` (``wikitext``, ``c4``, ``pile``) or a local ``.txt`` / ``.jsonl`` / ``.parquet``
file, or a folder of them. Both go through ``datasets.load_dataset`` (named sets by hub id,
local files through the ``text`` / ``json`` / ``parquet`` builders), so they share one code path. A set's
records are joined with ``"\\n\\n"`` into one text; ``token_windows`` tokenizes it once and cuts it into
consecutive windows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import QuantaError

Purpose = Literal["eval", "calibration"]
SEPARATOR = "\n\n"
TEXT_FIELD = "text"
# Local file suffix -> the datasets builder that reads it.
BUILDERS: dict[str, str] = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
LOCAL_HINT = "pass a local file instead: --data PATH (.txt, .jsonl or .parquet with a 'text' field, or a folder)"


@dataclass(frozen=True)
class HubSplit:
    """Where one split of a named set lives: ``load_dataset(path, config, data_files=..., split=...)``."""

    path: str
    config: str | None
    split: str
    data_files: dict[str, str] | None = None

    def describe(self) -> str:
        files = f", {next(iter(self.data_files.values()))}" if self.data_files else ""
        return f"{self.path}{':' + self.config if self.config else ''} {self.split}{files}"


# Eval reads a held-out split; calibration reads training text, so a calibrated model is never
# evaluated on the text it was calibrated on. c4 and the pile are far too big to fetch whole: one
# file each (GPTQ's c4 shards; AWQ's pile calibration set; the Pile's own test file).
NAMED: dict[str, dict[Purpose, HubSplit]] = {
    "wikitext": {
        "eval": HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        "calibration": HubSplit("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    },
    "c4": {
        "eval": HubSplit("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
        "calibration": HubSplit("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
    },
    "pile": {
        "eval": HubSplit("monology/pile-uncopyrighted", None, "test", {"test": "test.jsonl.zst"}),
        "calibration": HubSplit("mit-han-lab/pile-val-backup", None, "validation"),
    },
}


def _datasets() -> Any:
    try:
        import datasets  # optional dependency, and slow to import: only when data is needed
    except ImportError:
        raise QuantaError("--data needs the datasets package: pip install 'quanta[data]'") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _column(ds: Any, where: str) -> list[str]:
    """The ``text`` column of a loaded ``datasets.Dataset`` as a list of strings."""
    if TEXT_FIELD not in ds.column_names:
        raise QuantaError(f"{where} has no '{TEXT_FIELD}' field (found: {', '.join(ds.column_names) or 'none'})")
    return [t for t in ds[TEXT_FIELD] if t is not None]


def _load_named(name: str, purpose: Purpose) -> list[str]:
    """Records of a named set; one line naming the set and the local-file way out if it cannot be fetched."""
    spec = NAMED[name][purpose]
    datasets = _datasets()
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    fetch_errors = (ConnectionError, TimeoutError, LocalEntryNotFoundError, HfHubHTTPError, FileNotFoundError)
    try:
        ds = datasets.load_dataset(spec.path, spec.config, data_files=spec.data_files, split=spec.split)
    except (*fetch_errors, datasets.exceptions.DatasetNotFoundError, ImportError) as exc:
        if _offline() and isinstance(exc, fetch_errors):
            why = "offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and not in the datasets cache"
        else:
            why = _first_line(exc)
        raise QuantaError(f"cannot fetch the {name} data set ({spec.describe()}): {why}; {LOCAL_HINT}") from None
    return _column(ds, f"the {name} data set")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _offline() -> bool:
    flags = (os.environ.get(v, "").upper() for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def local_files(path: Path) -> list[Path]:
    """The readable files at ``path``: itself, or every .txt/.jsonl/.parquet under a folder (hidden ones skipped)."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise QuantaError(f"{path}: unsupported data file type (use {', '.join(BUILDERS)})")
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise QuantaError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
    return files


def _load_local(path: Path) -> list[str]:
    """Records of local files in name order; a .txt file is one record (read whole, line breaks kept)."""
    datasets = _datasets()
    records: list[str] = []
    for file in local_files(path):
        builder = BUILDERS[file.suffix.lower()]
        options = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(file)], split="train", **options)
        except Exception as exc:  # datasets wraps parse errors in several types, the cause is what helps
            why = _first_line(exc.__cause__ or exc)
            raise QuantaError(f"{file}: cannot read it as {builder} data ({why})") from None
        records.extend(_column(ds, str(file)))
    return records


def load_records(data: str, purpose: Purpose = "eval") -> list[str]:
    """The text records of ``data`` (a name in ``NAMED`` or a local path) for ``purpose``."""
    path = Path(data).expanduser()
    if path.exists():
        records = _load_local(path)
    elif data.lower() in NAMED:
        records = _load_named(data.lower(), purpose)
    else:
        raise QuantaError(f"unknown data {data!r}: not a file or folder, nor one of {', '.join(NAMED)}")
    if not any(r.strip() for r in records):
        raise QuantaError(f"{data}: no text found")
    return records


def load_text(data: str, purpose: Purpose = "eval") -> str:
    """All records of ``data`` joined with a blank line (``"\\n\\n"``), in order."""
    return SEPARATOR.join(load_records(data, purpose))


def describe(data: str, purpose: Purpose = "eval") -> str:
    """A short label of ``data`` for reports: the hub id and split, or the local path."""
    path = Path(data).expanduser()
    if not path.exists() and data.lower() in NAMED:
        return f"{data.lower()} ({NAMED[data.lower()][purpose].describe()})"
    return str(path)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids (1-D int64) of ``text``, tokenized once with the tokenizer's default special tokens."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_windows(ids: torch.Tensor, seq_len: int, max_samples: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``ids``: (n, seq_len), the last partial one dropped, n <= max_samples."""
    if seq_len < 2:
        raise QuantaError(f"--seq-len must be at least 2, got {seq_len}")
    if max_samples is not None and max_samples < 1:
        raise QuantaError(f"--max-samples must be at least 1, got {max_samples}")
    n = ids.numel() // seq_len
    if n == 0:
        raise QuantaError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    if max_samples is not None:
        n = min(n, max_samples)
    return ids[: n * seq_len].reshape(n, seq_len)


def token_windows(
    tokenizer: Any, data: str, seq_len: int, max_samples: int | None = None, purpose: Purpose = "eval"
) -> torch.Tensor:
    """``data`` loaded, joined, tokenized once and cut into (n, seq_len) int64 windows."""
    return split_windows(tokenize(tokenizer, load_text(data, purpose)), seq_len, max_samples)


def sample_windows(ids: torch.Tensor, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at random offsets of ``ids`` (calibration): (n, seq_len) int64."""
    if ids.numel() < seq_len:
        raise QuantaError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
