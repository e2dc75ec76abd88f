"""The on-disk format (DESIGN §3): tensor names of a quantized weight and the quantization map.

For a quantized ``P.weight`` the folder holds ``P.weight`` (packed codes), ``P.weight_scale`` and, where
the scheme has them, ``P.weight_global_scale`` and ``P.weight_zero_point`` (``P.input_scale`` for static
activation scales). ``quantization_map.json`` maps each quantized tensor's original name to
``{"scheme", "block_size", "method", "shape", "dtype", ...}``; it alone is enough to dequantize.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import QuantaError
from .schemes import QuantState, get_scheme
from .schemes.base import parse_dtype

FORMAT = "quanta"
FORMAT_VERSION = 1
MAP_FILE = "quantization_map.json"
_REQUIRED_ENTRY_KEYS = ("scheme", "block_size", "shape", "dtype")

# QuantState field -> suffix appended to the weight's name on disk.
SUFFIXES: dict[str, str] = {
    "qdata": "",
    "scale": "_scale",
    "global_scale": "_global_scale",
    "zero_point": "_zero_point",
}


def state_to_tensors(name: str, state: QuantState) -> dict[str, torch.Tensor]:
    """The tensors to write for the quantized tensor ``name``, keyed by their names on disk."""
    tensors, _ = state.to_dict()
    return {name + SUFFIXES[field]: t.contiguous() for field, t in tensors.items()}


def map_entry(state: QuantState, method: str = "naive", **extra: Any) -> dict[str, Any]:
    """The quantization-map entry for ``state``: scheme, block_size, method, shape, dtype (+ extra)."""
    _, meta = state.to_dict()
    entry = {
        "scheme": meta["scheme"],
        "block_size": meta["block_size"],
        "method": method,
        "shape": meta["shape"],
        "dtype": meta["dtype"],
    }
    entry.update(extra)
    return entry


def tensors_to_state(name: str, entry: dict[str, Any], get: Callable[[str], torch.Tensor | None]) -> QuantState:
    """Rebuild the ``QuantState`` of ``name`` from its map entry; ``get(key)`` returns a stored tensor or None."""
    tensors = {field: get(name + suffix) for field, suffix in SUFFIXES.items()}
    tensors = {field: t for field, t in tensors.items() if t is not None}
    meta = {k: entry[k] for k in ("scheme", "block_size", "shape", "dtype")}
    return QuantState.from_dict(tensors, meta)


def stored_names(name: str, keys: set[str]) -> list[str]:
    """The on-disk names among ``keys`` that belong to the quantized tensor ``name``."""
    return [name + suffix for suffix in SUFFIXES.values() if name + suffix in keys]


def read_map(path: str | Path) -> dict[str, Any]:
    """The validated ``quantization_map.json`` of the quanta folder ``path`` (QuantaError if it is not one)."""
    folder = folder_of(path)
    map_path = folder / MAP_FILE
    if not map_path.is_file():
        raise QuantaError(f"{folder} is not a quanta folder (no {MAP_FILE})")
    try:
        qmap = json.loads(map_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantaError(f"{map_path} is not valid JSON: {exc}") from None
    if not isinstance(qmap, dict) or qmap.get("format") != FORMAT:
        found = qmap.get("format") if isinstance(qmap, dict) else type(qmap).__name__
        raise QuantaError(f"{map_path} has format {found!r}, expected {FORMAT!r}")
    version = qmap.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise QuantaError(
            f"{map_path} has format_version {version!r}; this quanta reads versions 1 to {FORMAT_VERSION} "
            "(a newer quanta wrote it?)"
        )
    tensors = qmap.get("tensors")
    if not isinstance(tensors, dict):
        raise QuantaError(f"{map_path} has no 'tensors' mapping")
    for name, entry in tensors.items():
        missing = [k for k in _REQUIRED_ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise QuantaError(f"{map_path}: the entry for {name} lacks {', '.join(missing)}")
        try:
            get_scheme(entry["scheme"])
            parse_dtype(entry["dtype"])
        except ValueError as exc:
            raise QuantaError(f"{map_path}: {name}: {exc}") from None
    return qmap


def folder_of(path: str | Path) -> Path:
    """``path`` as a folder; a one-line error if it is missing or a file."""
    folder = Path(path)
    if not folder.exists():
        raise QuantaError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise QuantaError(f"{folder} is not a folder (a quanta model is a folder with {MAP_FILE})")
    return folder
