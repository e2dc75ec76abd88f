"""The Triton kernels as ``torch.library`` custom ops (namespace ``quanta``), each with a fake (meta)
implementation, so ``torch.compile`` and the pipeline see one opaque op per kernel.

A schema cannot return ``None``: ``quanta::quantize_int`` returns an empty zero-point tensor when
symmetric, and its wrapper in ``TRITON_OPS`` (what ``ops.TRITON`` holds) turns that back into ``None``.
Imported only where Triton is installed (by ``quantize_cli.kernels.triton.register``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.library import custom_op

from .triton import codebook as _codebook
from .triton import fp8 as _fp8
from .triton import integer as _integer
from .triton import mxfp4 as _mxfp4
from .triton import nvfp4 as _nvfp4
from .triton import search as _search

Tensor = torch.Tensor
_U8, _F32, _F8 = torch.uint8, torch.float32, torch.float8_e4m3fn


def _codes_shape(x: Tensor, packed: bool) -> tuple[int, int]:
    rows, cols = x.shape
    return rows, cols // 2 if packed else cols


def _scale_shape(x: Tensor, block_size: int) -> tuple[int, int]:
    rows, cols = x.shape
    return rows, cols // block_size


def _dequant_shape(qdata: Tensor, packed: bool) -> tuple[int, int]:
    rows, width = qdata.shape
    return rows, width * 2 if packed else width


# ---- codebook (nf4, fp4, nf8) -----------------------------------------------------------------------------


@custom_op("quanta::quantize_codebook", mutates_args=())
def quantize_codebook(x: Tensor, block_size: int, codebook: Tensor, pack: bool) -> tuple[Tensor, Tensor]:
    return _codebook.quantize_codebook(x, block_size, codebook, pack)


@quantize_codebook.register_fake
def _(x: Tensor, block_size: int, codebook: Tensor, pack: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(_codes_shape(x, pack), dtype=_U8), x.new_empty(_scale_shape(x, block_size), dtype=_F32)


@custom_op("quanta::dequantize_codebook", mutates_args=())
def dequantize_codebook(
    qdata: Tensor, scale: Tensor, codebook: Tensor, block_size: int, packed: bool, dtype: torch.dtype
) -> Tensor:
    return _codebook.dequantize_codebook(qdata, scale, codebook, block_size, packed, dtype)


@dequantize_codebook.register_fake
def _(qdata: Tensor, scale: Tensor, codebook: Tensor, block_size: int, packed: bool, dtype: torch.dtype) -> Tensor:
    return qdata.new_empty(_dequant_shape(qdata, packed), dtype=dtype)


# ---- integer (int8, int4) ---------------------------------------------------------------------------------


@custom_op("quanta::quantize_int", mutates_args=())
def quantize_int(x: Tensor, block_size: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    q, scale, zero = _integer.quantize_int(x, block_size, bits, symmetric)
    return q, scale, zero if zero is not None else x.new_empty((0,), dtype=_U8)


@quantize_int.register_fake
def _(x: Tensor, block_size: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    scale_shape = _scale_shape(x, block_size)
    q = x.new_empty(_codes_shape(x, bits == 4), dtype=_U8 if bits == 4 else torch.int8)
    zero = x.new_empty((0,) if symmetric else scale_shape, dtype=_U8)
    return q, x.new_empty(scale_shape, dtype=_F32), zero


@custom_op("quanta::dequantize_int", mutates_args=())
def dequantize_int(
    qdata: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: int, bits: int, dtype: torch.dtype
) -> Tensor:
    return _integer.dequantize_int(qdata, scale, zero_point, block_size, bits, dtype)


@dequantize_int.register_fake
def _(
    qdata: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: int, bits: int, dtype: torch.dtype
) -> Tensor:
    return qdata.new_empty(_dequant_shape(qdata, bits == 4), dtype=dtype)


# ---- fp8 --------------------------------------------------------------------------------------------------


@custom_op("quanta::quantize_fp8", mutates_args=())
def quantize_fp8(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    return _fp8.quantize_fp8(x, block_size)


@quantize_fp8.register_fake
def _(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=_F8), x.new_empty(_scale_shape(x, block_size), dtype=_F32)


@custom_op("quanta::dequantize_fp8", mutates_args=())
def dequantize_fp8(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return _fp8.dequantize_fp8(qdata, scale, block_size, dtype)


@dequantize_fp8.register_fake
def _(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return qdata.new_empty(qdata.shape, dtype=dtype)


# ---- nvfp4 ------------------------------------------------------------------------------------------------


@custom_op("quanta::nvfp4_global_scale", mutates_args=())
def nvfp4_global_scale(x: Tensor) -> Tensor:
    return _nvfp4.nvfp4_global_scale(x)


@nvfp4_global_scale.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((), dtype=_F32)


@custom_op("quanta::quantize_nvfp4", mutates_args=())
def quantize_nvfp4(x: Tensor, block_size: int, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    return _nvfp4.quantize_nvfp4(x, block_size, global_scale)


@quantize_nvfp4.register_fake
def _(x: Tensor, block_size: int, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(_codes_shape(x, True), dtype=_U8), x.new_empty(_scale_shape(x, block_size), dtype=_F8)


@custom_op("quanta::dequantize_nvfp4", mutates_args=())
def dequantize_nvfp4(qdata: Tensor, scale: Tensor, global_scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return _nvfp4.dequantize_nvfp4(qdata, scale, global_scale, block_size, dtype)


@dequantize_nvfp4.register_fake
def _(qdata: Tensor, scale: Tensor, global_scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return qdata.new_empty(_dequant_shape(qdata, True), dtype=dtype)


# ---- mxfp4 ------------------------------------------------------------------------------------------------


@custom_op("quanta::quantize_mxfp4", mutates_args=())
def quantize_mxfp4(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    return _mxfp4.quantize_mxfp4(x, block_size)


@quantize_mxfp4.register_fake
def _(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(_codes_shape(x, True), dtype=_U8), x.new_empty(_scale_shape(x, block_size), dtype=_U8)


@custom_op("quanta::dequantize_mxfp4", mutates_args=())
def dequantize_mxfp4(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return _mxfp4.dequantize_mxfp4(qdata, scale, block_size, dtype)


@dequantize_mxfp4.register_fake
def _(qdata: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    return qdata.new_empty(_dequant_shape(qdata, True), dtype=dtype)


# ---- block-scale searches (nvfp4, mxfp4: sse or hessian) ---------------------------------------------------


@custom_op("quanta::search_nvfp4", mutates_args=())
def search_nvfp4(x: Tensor, block_size: int, global_scale: Tensor, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    return _search.search_nvfp4(x, block_size, global_scale, hessian)


@search_nvfp4.register_fake
def _(x: Tensor, block_size: int, global_scale: Tensor, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    return x.new_empty(_codes_shape(x, True), dtype=_U8), x.new_empty(_scale_shape(x, block_size), dtype=_F8)


@custom_op("quanta::search_mxfp4", mutates_args=())
def search_mxfp4(x: Tensor, block_size: int, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    return _search.search_mxfp4(x, block_size, hessian)


@search_mxfp4.register_fake
def _(x: Tensor, block_size: int, hessian: Tensor | None) -> tuple[Tensor, Tensor]:
    return x.new_empty(_codes_shape(x, True), dtype=_U8), x.new_empty(_scale_shape(x, block_size), dtype=_U8)


# ---- what ops.TRITON holds: the reference signatures over the custom ops -----------------------------------


def _quantize_int(x: Tensor, block_size: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    q, scale, zero = torch.ops.quanta.quantize_int(x, block_size, bits, symmetric)
    return q, scale, None if symmetric else zero


TRITON_OPS: dict[str, Callable[..., object]] = {
    "quantize_codebook": torch.ops.quanta.quantize_codebook,
    "dequantize_codebook": torch.ops.quanta.dequantize_codebook,
    "quantize_int": _quantize_int,
    "dequantize_int": torch.ops.quanta.dequantize_int,
    "quantize_fp8": torch.ops.quanta.quantize_fp8,
    "dequantize_fp8": torch.ops.quanta.dequantize_fp8,
    "nvfp4_global_scale": torch.ops.quanta.nvfp4_global_scale,
    "quantize_nvfp4": torch.ops.quanta.quantize_nvfp4,
    "dequantize_nvfp4": torch.ops.quanta.dequantize_nvfp4,
    "quantize_mxfp4": torch.ops.quanta.quantize_mxfp4,
    "dequantize_mxfp4": torch.ops.quanta.dequantize_mxfp4,
    "search_nvfp4": torch.ops.quanta.search_nvfp4,
    "search_mxfp4": torch.ops.quanta.search_mxfp4,
}
