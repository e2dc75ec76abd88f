"""Triton kernels, one module per format, each with the signature of its reference in
``quantize_cli.kernels.reference``."""

from __future__ import annotations

from collections.abc import Callable


def register(table: dict[str, Callable[..., object]]) -> None:
    """Add every available Triton kernel to ``table`` (op name -> function)."""
    import triton  # noqa: F401 - raises ImportError where Triton is missing
