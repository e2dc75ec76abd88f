"""The on-disk format (DESIGN §3): tensor names of a quantized weight and the quantization map.

For a quantized ``P.weight`` the folder holds ``P.weight`` (packed codes), ``P.weight_scale`` and, where
the scheme has them, ``P.weight_global_scale`` and ``P.weight_zero_point`` (``P.input_scale`` for static
activation scales). ``quantization_map.json`` maps each quantized tensor's original name to
``{"scheme", "block_size", "method", "shape", "dtype", ...}``; it alone is enough to dequantize.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .schemes import QuantState

FORMAT = "quanta"
FORMAT_VERSION = 1
MAP_FILE = "quantization_map.json"

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
