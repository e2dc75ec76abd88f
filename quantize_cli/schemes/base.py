"""The ``Scheme`` record and ``QuantState``, the quantized form of one tensor."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor

FORMAT_VERSION = 1
_STORED_TENSORS = ("qdata", "scale", "global_scale", "zero_point")


class Quantized(NamedTuple):
    """What a scheme's quantize function returns for a padded 2-D input."""

    qdata: Tensor
    scale: Tensor | None = None
    global_scale: Tensor | None = None
    zero_point: Tensor | None = None


@dataclass
class QuantState:
    """A quantized tensor: everything needed to dequantize it.

    ``qdata``: codes of the input seen as (rows, cols) with rows = prod(shape[:-1]); the last dimension
    is padded with zeros up to a multiple of ``block_size`` (the padding is ``qdata``'s width minus
    ``shape[-1]``, dropped on dequantize). 4-bit codes are packed two per uint8, first element in the
    high nibble, so ``qdata`` is (rows, padded_cols // 2); 8-bit codes are (rows, padded_cols).
    ``scale``: one per block, (rows, padded_cols // block_size). ``global_scale``: NVFP4's fp32 per-tensor
    decode scale. ``zero_point``: asymmetric int4's uint8 zero per block. ``codebook``: the NF/FP values
    a code indexes (a constant of the scheme: not stored on disk, not counted in ``nbytes``).
    """

    qdata: Tensor
    scale: Tensor | None
    global_scale: Tensor | None
    zero_point: Tensor | None
    codebook: Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: str
    block_size: int | None

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, global scale, zero points)."""
        return sum(t.numel() * t.element_size() for t in self._stored().values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _stored(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in _STORED_TENSORS if getattr(self, k) is not None}

    def to_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, metadata): the stored tensors by field name, and JSON-able metadata."""
        meta = {
            "scheme": self.scheme,
            "block_size": self.block_size,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "format_version": FORMAT_VERSION,
        }
        return dict(self._stored()), meta

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> QuantState:
        """Inverse of :meth:`to_dict`; the codebook comes back from the scheme registry."""
        from .registry import get_scheme  # noqa: PLC0415 - registry imports this module

        scheme = get_scheme(metadata["scheme"])
        qdata = tensors["qdata"]
        return cls(
            qdata=qdata,
            scale=tensors.get("scale"),
            global_scale=tensors.get("global_scale"),
            zero_point=tensors.get("zero_point"),
            codebook=scheme.codebook(qdata.device),
            shape=tuple(metadata["shape"]),
            dtype=parse_dtype(metadata["dtype"]),
            scheme=scheme.name,
            block_size=metadata["block_size"],
        )


QuantizeFn = Callable[[Tensor, int, str, dict[str, Any]], Quantized]
DequantizeFn = Callable[[QuantState, str], Tensor]


@dataclass(frozen=True)
class Scheme:
    """A quantization format: data plus its quantize and dequantize functions.

    ``quantize_fn(x, block_size, backend, options)`` gets a 2-D float tensor padded to whole blocks;
    ``dequantize_fn(state, backend)`` returns the padded (rows, cols) tensor in ``state.dtype``.
    """

    name: str
    bits: int
    default_block_size: int | None
    quantize_fn: QuantizeFn
    dequantize_fn: DequantizeFn
    description: str
    scale_bytes: float = 4.0
    tensor_bytes: int = 0
    needs_calibration: bool = False
    per_row: bool = False  # one scale per row (block = the last dimension), e.g. for int8 x int8 matmuls
    aliases: tuple[str, ...] = ()
    kernel_ops: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("naive",)
    codebook_values: tuple[float, ...] | None = None
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.bits == 4

    def codebook(self, device: torch.device | str = "cpu") -> Tensor | None:
        if self.codebook_values is None:
            return None
        return torch.tensor(self.codebook_values, dtype=torch.float32, device=device)

    def bits_per_weight(self, block_size: int | None = None) -> float:
        """Storage bits per element including block scales (per-tensor scales excluded)."""
        block = block_size or self.default_block_size
        return self.bits + (8 * self.scale_bytes / block if block else 0.0)


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; valid: {', '.join(_DTYPES)}") from None
