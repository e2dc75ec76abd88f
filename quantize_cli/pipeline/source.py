"""Where a checkpoint comes from (hub id, folder, one file) and reading it one tensor at a time.

Only the safetensors headers are read to list tensors (name, shape, dtype); data is read later, one
tensor per call, with ``safe_open``. Pickled checkpoints (``.bin``/``.pt``) are refused unless asked for,
and then loaded with ``torch.load(weights_only=True, mmap=True)`` so they are paged in lazily too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import QuantaError
from .writer import INDEX_FILE, TORCH_DTYPES

WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files fetched from the hub: weights, configs, tokenizer files, chat templates.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the checkpoint as its header describes it: no data read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Source:
    """A checkpoint: its tensors in reading order, the folder holding config and tokenizer files (if any).

    ``model``: the hub id, or the absolute local path; ``revision``: the hub commit read (None for local
    paths); ``root``: the folder with ``config.json`` etc. (None for a bare file).
    """

    model: str
    revision: str | None
    root: Path | None
    files: list[Path]
    tensors: dict[str, TensorInfo]
    pickle: bool = False
    config: dict[str, Any] | None = None
    name: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> list[list[Any]]:
        """(file, size, mtime) of every weight file: changes when the checkpoint does."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
        return out


def resolve_source(model: str, revision: str | None = None, allow_pickle: bool = False) -> Source:
    """Find ``model`` (local file, local folder, or hub id) and read its tensor headers."""
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise QuantaError(f"--revision applies to hub ids only; {model} is a local path")
        root, files, is_pickle = _local_files(path, allow_pickle)
        resolved_revision = None
        name = path.stem if path.is_file() else path.resolve().name
        shown = str(path.resolve())
    elif _looks_like_repo_id(model):
        root = _download(model, revision, allow_pickle)
        files, is_pickle = _folder_weights(root, allow_pickle, shown=model)
        resolved_revision = root.name  # the snapshot folder is named by its commit hash
        name = model.rstrip("/").split("/")[-1]
        shown = model
    else:
        raise QuantaError(f"model not found: {model} (no such file or folder, and not a hub id)")
    tensors = _read_pickle_headers(files) if is_pickle else _read_headers(files)
    if not tensors:
        raise QuantaError(f"no tensors in {model}")
    config = _read_config(root) if root is not None else None
    return Source(shown, resolved_revision, root, files, tensors, is_pickle, config, name)


def _looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.endswith(WEIGHT_SUFFIXES + PICKLE_SUFFIXES)


def _refuse_pickle(what: str) -> QuantaError:
    return QuantaError(
        f"{what} holds only pickle weights (.bin/.pt), which can run code when loaded; "
        "pass --allow-pickle to read them anyway (with torch.load(weights_only=True))"
    )


def _local_files(path: Path, allow_pickle: bool) -> tuple[Path | None, list[Path], bool]:
    """(root folder or None, weight files, whether they are pickles) for a local file or folder."""
    if path.is_dir():
        files, is_pickle = _folder_weights(path, allow_pickle, shown=str(path))
        return path, files, is_pickle
    if path.suffix == ".safetensors":
        return None, [path], False
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _refuse_pickle(str(path))
        return None, [path], True
    raise QuantaError(f"unsupported model file {path}: expected a .safetensors file or a model folder")


def _folder_weights(root: Path, allow_pickle: bool, shown: str) -> tuple[list[Path], bool]:
    """The weight files of a HF folder: from its index when it has one, else every file of the type."""
    for index_name, suffixes, is_pickle in (
        (INDEX_FILE, WEIGHT_SUFFIXES, False),
        (PICKLE_INDEX, PICKLE_SUFFIXES, True),
    ):
        found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in suffixes)
        if not found and not (root / index_name).is_file():
            continue
        if is_pickle and not allow_pickle:
            raise _refuse_pickle(shown)
        if (root / index_name).is_file():
            return _indexed_files(root, index_name), is_pickle
        return found, is_pickle
    raise QuantaError(f"no .safetensors weights in {shown}")


def _indexed_files(root: Path, index_name: str) -> list[Path]:
    try:
        weight_map = json.loads((root / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QuantaError(f"corrupt index file {root / index_name}: {exc}") from None
    files = [root / f for f in dict.fromkeys(sorted(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise QuantaError(f"shard {f} listed in {index_name} is missing")
    return files


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """The local snapshot folder of a hub repo (from the cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise QuantaError(f"model not found: {repo_id} is not a local path nor a hub repo you can access") from None
    except LocalEntryNotFoundError:
        raise QuantaError(
            f"model not found: {repo_id} is not a local path, and not in the hub cache (offline or no connection)"
        ) from None
    except HfHubHTTPError as exc:
        raise QuantaError(f"cannot download {repo_id}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # bad repo id / revision format
        raise QuantaError(f"model not found: {repo_id} ({exc})") from None


def _read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the safetensors ``files`` (headers only)."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    dtype = TORCH_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise QuantaError(f"tensor {name} in {f} has unsupported dtype {sl.get_dtype()}")
                    if name in tensors:
                        raise QuantaError(f"tensor {name} appears in both {tensors[name].file} and {f}")
                    tensors[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, f)
        except SafetensorError as exc:
            raise QuantaError(f"corrupt or truncated safetensors file {f}: {exc}") from None
        except OSError as exc:
            raise QuantaError(f"cannot read {f}: {exc}") from None
    return tensors


def _load_pickle(f: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean "cannot read"
        raise QuantaError(
            f"cannot load pickle {f}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise QuantaError(f"pickle {f} is not a flat state dict of tensors")
    return obj


def _read_pickle_headers(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, t in _load_pickle(f).items():
            tensors[name] = TensorInfo(name, tuple(t.shape), t.dtype, f)
    return tensors


def _read_config(root: Path) -> dict[str, Any] | None:
    cfg = root / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise QuantaError(f"corrupt {cfg}: {exc}") from None


@dataclass
class SourceReader:
    """Reads one tensor at a time.

    A safetensors file is opened for each tensor and closed right after: ``safe_open`` maps the file,
    and pages of a mapping left open stay resident, so a long-lived handle would grow to the whole file.
    """

    source: Source
    _pickles: dict[Path, _PickleHandle] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU, read from disk now."""
        info = self.source.tensors[name]
        try:
            if self.source.pickle:
                tensor = self._pickle(info.file).get_tensor(name)
            else:
                with safe_open(info.file, framework="pt") as fh:
                    tensor = fh.get_tensor(name)
        except SafetensorError as exc:
            raise QuantaError(f"corrupt or truncated safetensors file {info.file}: {exc}") from None
        if tuple(tensor.shape) != info.shape:
            raise QuantaError(f"tensor {name} in {info.file} does not match its header")
        return tensor

    def _pickle(self, f: Path) -> _PickleHandle:
        if f not in self._pickles:
            self.close()  # files are read in order: drop the previous one
            self._pickles[f] = _PickleHandle(f)
        return self._pickles[f]

    def close(self) -> None:
        for h in self._pickles.values():
            h.close()
        self._pickles.clear()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _PickleHandle:
    """A pickled state dict loaded with ``mmap=True``: tensors are paged in when read."""

    def __init__(self, f: Path) -> None:
        self._tensors = _load_pickle(f)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name].clone()  # own the memory: the mmap goes away on close

    def close(self) -> None:
        self._tensors = {}
