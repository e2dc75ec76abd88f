"""Triton kernels, one module per format, each with the signature of its reference in
``quantize_cli.kernels.reference``: codebook (nf4, fp4, nf8), integer (int8, int4), fp8, nvfp4, mxfp4.
``common`` holds the tiling and the exact rounding/bit codecs they share."""

from __future__ import annotations

from collections.abc import Callable


def register(table: dict[str, Callable[..., object]]) -> None:
    """Add every Triton kernel to ``table`` (op name -> function), each called through its
    ``torch.library`` custom op (``quanta::<op>``, see ``quantize_cli.kernels.library``)."""
    import triton  # noqa: F401, PLC0415 - raises ImportError where Triton is missing

    from ..library import TRITON_OPS  # noqa: PLC0415 - defines the custom ops on first use

    table.update(TRITON_OPS)
