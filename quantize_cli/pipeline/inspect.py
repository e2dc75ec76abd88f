"""Summarise a quanta folder from its map and shard headers (no tensor data is read)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..errors import QuantaError
from ..format import MAP_FILE, folder_of, read_map, stored_names
from .writer import INDEX_FILE, SINGLE_FILE, TORCH_DTYPES


@dataclass
class Group:
    """Tensors stored one way: a scheme (``kept`` False) or an unquantized dtype (``kept`` True)."""

    label: str
    kept: bool
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    block_sizes: set[int] = field(default_factory=set)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(1, self.params)

    def row(self) -> list[str]:
        """Table cells: stored as, tensors, params, size, bits/weight, block sizes."""
        blocks = ", ".join(str(b) for b in sorted(self.block_sizes)) or "-"
        return [
            self.label,
            str(self.tensors),
            f"{self.params:,}",
            human_bytes(self.bytes),
            f"{self.bits_per_weight:.3g}",
            blocks,
        ]


@dataclass
class Inspection:
    """What ``quanta inspect`` shows: source, recipe, groups by scheme/dtype, sizes."""

    path: Path
    format_version: int
    quanta_version: str
    source: dict[str, Any]
    recipe: dict[str, Any]
    groups: list[Group]
    files: list[str]

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def source_bytes(self) -> int | None:
        return self.source.get("bytes")

    @property
    def ratio(self) -> float | None:
        """Size of the folder's tensors over the source's (None when the source size is unknown)."""
        return self.bytes / self.source_bytes if self.source_bytes else None

    @property
    def quantized(self) -> list[Group]:
        return [g for g in self.groups if not g.kept]

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight across every scheme."""
        q = self.quantized
        return 8 * sum(g.bytes for g in q) / max(1, sum(g.params for g in q))

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) lines: source, recipe, size against the source, bits per weight."""
        src = self.source
        source = f"{src.get('model', '?')}" + (f" @ {src['revision']}" if src.get("revision") else "")
        r = self.recipe
        rules, ignore = r.get("rules") or [], r.get("ignore") or []
        recipe = f"{r.get('name', '?')} (scheme {r.get('scheme')}, {len(rules)} rule(s), ignore {ignore})"
        size = human_bytes(self.bytes)
        overall = 8 * self.bytes / max(1, self.params)
        if self.ratio is not None:
            size += f" vs {human_bytes(self.source_bytes or 0)} source ({self.ratio:.3f}x)"
        return [
            ("source", source),
            ("recipe", recipe),
            (
                "format",
                f"quanta v{self.format_version}, written by quanta {self.quanta_version}, {len(self.files)} shard(s)",
            ),
            ("size", size),
            ("bits/weight", f"{self.bits_per_weight:.3f} over quantized tensors, {overall:.3f} over all"),
        ]


def human_bytes(n: int) -> str:
    """Bytes in MB or GB (powers of ten, like file managers and the hub)."""
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _shard_files(path: Path) -> list[str]:
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise QuantaError(f"corrupt index {path / INDEX_FILE}: {exc}") from None
        return sorted(set(weight_map.values()))
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise QuantaError(f"{path} has no {SINGLE_FILE} nor {INDEX_FILE}")


def _headers(path: Path, files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Stored name -> (safetensors dtype, shape) over every shard."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in files:
        try:
            with safe_open(path / name, framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise QuantaError(f"corrupt or missing shard {path / name}: {exc}") from None
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    torch_dtype = TORCH_DTYPES.get(dtype)
    if torch_dtype is None:
        raise QuantaError(f"unsupported dtype {dtype} in a shard")
    return math.prod(shape) * torch_dtype.itemsize


def inspect_folder(path: str | Path) -> Inspection:
    """Read ``quantization_map.json`` and the shard headers of a folder written by ``quanta convert``."""
    root = folder_of(path)
    qmap = read_map(root)
    files = _shard_files(root)
    headers = _headers(root, files)
    groups: dict[str, Group] = {}
    owned: set[str] = set()
    for name, entry in qmap.get("tensors", {}).items():
        if name not in headers:
            raise QuantaError(f"tensor {name} is in {MAP_FILE} but in no shard")
        parts = stored_names(name, set(headers))
        g = groups.setdefault(entry["scheme"], Group(entry["scheme"], kept=False))
        g.tensors += 1
        g.params += math.prod(entry["shape"])
        g.bytes += sum(_nbytes(*headers[p]) for p in parts)
        if entry.get("block_size"):
            g.block_sizes.add(int(entry["block_size"]))
        owned.update(parts)
    for key, (dtype, shape) in headers.items():
        if key in owned:
            continue
        g = groups.setdefault(f"kept {dtype}", Group(f"{dtype} (kept)", kept=True))
        g.tensors += 1
        g.params += math.prod(shape)
        g.bytes += _nbytes(dtype, shape)
    ordered = sorted(groups.values(), key=lambda g: (g.kept, -g.params))
    return Inspection(
        path=root,
        format_version=int(qmap.get("format_version", 0)),
        quanta_version=str(qmap.get("quanta_version", "?")),
        source=dict(qmap.get("source") or {}),
        recipe=dict(qmap.get("recipe") or {}),
        groups=ordered,
        files=files,
    )
