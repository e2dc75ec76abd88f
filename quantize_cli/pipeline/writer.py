"""Write safetensors shards one tensor at a time, the index, and the output folder's staging area.

A shard's header is written first from the planned (dtype, shape) of every tensor it will hold; each
tensor's bytes are then written at its offset as soon as it is produced, so no shard is ever held in
memory. The layout (tensor order, offsets, header padding) is the one ``safetensors.torch.save_file``
produces, so a streamed shard is byte-identical to saving the same tensors in one go.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save as _st_save

from ..errors import QuantaError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_METADATA = {"format": "pt"}

# torch dtype <-> safetensors dtype string.
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
if hasattr(torch, "float8_e8m0fnu"):
    ST_DTYPES[torch.float8_e8m0fnu] = "F8_E8M0"
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """The dtype and shape a tensor will have on disk."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_names(count: int) -> list[str]:
    """Final file names of ``count`` shards: ``model.safetensors`` alone, else ``model-0000k-of-0000n``."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def split_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group names greedily, in order, into shards of at most ``max_bytes`` (a larger tensor sits alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards if shards[0] else []


def _safetensors_order(specs: Mapping[str, TensorSpec]) -> list[str]:
    """Names in the order safetensors lays tensors out (dtype alignment, then name), asked of safetensors."""
    empty = {name: torch.empty(0, dtype=spec.dtype) for name, spec in specs.items()}
    blob = _st_save(empty)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return [k for k in header if k != "__metadata__"]


def build_header(
    specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = SHARD_METADATA
) -> tuple[bytes, dict[str, int]]:
    """(header bytes incl. the 8-byte length, data offset of each tensor) for a shard of ``specs``."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    pos = 0
    for name in _safetensors_order(specs):
        spec = specs[name]
        if spec.dtype not in ST_DTYPES:
            raise QuantaError(f"cannot write tensor {name}: dtype {spec.dtype} has no safetensors name")
        entries[name] = {
            "dtype": ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [pos, pos + spec.nbytes],
        }
        offsets[name] = pos
        pos += spec.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text, offsets


class ShardWriter:
    """A safetensors file written header first, then tensor by tensor at planned offsets.

    The file is built as ``path + ".partial"`` and renamed to ``path`` by :meth:`close` once every
    planned tensor has been written, so ``path`` existing means the shard is complete.
    """

    def __init__(
        self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = SHARD_METADATA
    ) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.specs = dict(specs)
        header, offsets = build_header(self.specs, metadata)
        self._base = len(header)
        self._offsets = offsets
        self._pending = set(self.specs)
        self._fh = open(self.partial, "wb")
        self._fh.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device; must match its planned dtype and shape) at its offset."""
        spec = self.specs.get(name)
        if spec is None or name not in self._pending:
            raise QuantaError(f"internal error: tensor {name} is not planned for {self.path.name} (or written twice)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise QuantaError(
                f"internal error: tensor {name} came out {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {spec.dtype} {spec.shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.seek(self._base + self._offsets[name])
        self._fh.write(memoryview(data))
        self._pending.discard(name)

    def close(self) -> None:
        """Check every tensor was written, flush to disk and rename the file into place."""
        if self._pending:
            missing = ", ".join(sorted(self._pending)[:3])
            raise QuantaError(f"internal error: {self.path.name} is missing tensors ({missing})")
        self._fh.truncate(self._base + sum(s.nbytes for s in self.specs.values()))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        self._fh.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON atomically (temp file + rename), with a trailing newline."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def index_json(shards: list[list[str]], specs: Mapping[str, TensorSpec]) -> dict[str, object]:
    """The ``model.safetensors.index.json`` content for tensors grouped into ``shards``."""
    names = shard_names(len(shards))
    weight_map = {t: names[k] for k, shard in enumerate(shards) for t in shard}
    total = sum(spec.nbytes for spec in specs.values())
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``2GB``, ``500MB``, ``1.5GiB`` or ``1000000`` (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise QuantaError(f"invalid size {text!r}; use e.g. 2GB, 500MB, 1.5GiB or a number of bytes")
        unit = (m.group(2) or "").lower().rstrip("b")
        scale = 2 ** (10 * "kmgt".index(unit[0]) + 10) if unit.endswith("i") else _UNITS[unit]
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise QuantaError(f"size must be positive, got {text!r}")
    return value


@dataclass
class Staging:
    """An output folder built in a hidden sibling and renamed into place at the end.

    ``target``: the folder the user asked for; ``tmp``: ``.<name>.quanta-tmp`` next to it. A run killed
    midway leaves only ``tmp``; the previous ``target`` (if any) is untouched until :meth:`publish`.
    """

    target: Path

    @property
    def tmp(self) -> Path:
        return self.target.with_name(f".{self.target.name}.quanta-tmp")

    @property
    def _old(self) -> Path:
        return self.target.with_name(f".{self.target.name}.quanta-old")

    def check_target(self, overwrite: bool) -> None:
        """Refuse an existing target unless ``overwrite``; the parent folder must exist."""
        if self.target.exists() and not overwrite:
            raise QuantaError(f"output folder {self.target} already exists; pass --overwrite to replace it")
        if self.target.exists() and not self.target.is_dir():
            raise QuantaError(f"output path {self.target} exists and is not a folder")
        if not self.target.parent.is_dir():
            raise QuantaError(f"parent folder of the output {self.target} does not exist")

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def publish(self) -> None:
        """Move ``tmp`` to ``target``; an existing ``target`` is replaced (moved aside, then deleted)."""
        if self.target.exists():
            shutil.rmtree(self._old, ignore_errors=True)
            os.replace(self.target, self._old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(self._old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
