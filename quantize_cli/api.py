"""The Python API: ``quantize`` a tensor into a ``QuantState`` and ``dequantize`` it back."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .kernels.ops import BACKENDS
from .schemes import QuantState, Scheme, get_scheme

Tensor = torch.Tensor


def check_block_size(scheme: Scheme, block_size: int | None) -> int | None:
    """The block size to use: the scheme's default for None; a clear ValueError if it makes no sense."""
    if scheme.default_block_size is None:
        return None
    if block_size is None:
        return scheme.default_block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if scheme.packed and block_size % 2:
        raise ValueError(f"block_size must be even for the 4-bit scheme {scheme.name} (got {block_size})")
    return block_size


def _row_block(scheme: Scheme, block_size: int | None, x: Tensor) -> int:
    """The block of a per-row scheme: the whole last dimension."""
    cols = x.shape[-1] if x.dim() else 1
    if block_size not in (None, cols):
        raise ValueError(f"{scheme.name} uses one scale per row; block_size must be None (got {block_size})")
    return cols


def _check_input(x: Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf values; quantization needs finite weights")


def _as_rows(x: Tensor, block_size: int | None) -> Tensor:
    """View ``x`` as (rows, cols) and zero-pad cols to a multiple of ``block_size``."""
    cols = x.shape[-1] if x.dim() else 1
    x2 = x.reshape(-1, cols)
    if block_size is not None and cols % block_size:
        x2 = F.pad(x2, (0, block_size - cols % block_size))
    return x2.contiguous()


def quantize(
    x: Tensor,
    scheme: str = "nf4",
    block_size: int | None = None,
    backend: str = "auto",
    **options: Any,
) -> QuantState:
    """Quantize a floating-point tensor of any shape with a registered scheme.

    Blocks run along the last dimension (``block_size=None``: the scheme's default; a block equal to
    the last dimension gives one scale per row). A last dimension the block does not divide is
    zero-padded; ``dequantize`` drops the padding. ``backend``: ``auto`` (Triton on CUDA, else the
    reference), ``reference`` or ``triton``. Scheme options: ``symmetric=False`` for int4 with a zero
    point; ``global_scale=`` to fix NVFP4's per-tensor scale.
    """
    spec = get_scheme(scheme)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"scheme {spec.name} takes no option(s) {', '.join(sorted(unknown))}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    _check_input(x)
    block = _row_block(spec, block_size, x) if spec.per_row else check_block_size(spec, block_size)
    parts = spec.quantize_fn(_as_rows(x, block), block, backend, options)
    return QuantState(
        qdata=parts.qdata,
        scale=parts.scale,
        global_scale=parts.global_scale,
        zero_point=parts.zero_point,
        codebook=spec.codebook(x.device),
        shape=tuple(x.shape),
        dtype=x.dtype,
        scheme=spec.name,
        block_size=block,
    )


def dequantize(state: QuantState, backend: str = "auto", dtype: torch.dtype | None = None) -> Tensor:
    """The float tensor a ``QuantState`` stands for, in its original shape and dtype (or ``dtype``)."""
    spec = get_scheme(state.scheme)
    out = spec.dequantize_fn(state, backend)
    cols = state.shape[-1] if state.shape else 1
    out = out[:, :cols].reshape(state.shape)
    return out.to(dtype) if dtype is not None else out


def bits_per_weight(state: QuantState) -> float:
    """Stored bits per element of ``state``, everything included."""
    return 8 * state.nbytes / max(1, math.prod(state.shape))
