"""Dispatch between the reference and the Triton implementation of each kernel op.

Both implementations of an op share one signature; ``resolve`` picks one by backend and device.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import reference, scale_search

BACKENDS = ("auto", "reference", "triton")

REFERENCE: dict[str, Callable[..., object]] = {
    "quantize_codebook": reference.quantize_codebook,
    "dequantize_codebook": reference.dequantize_codebook,
    "quantize_int": reference.quantize_int,
    "dequantize_int": reference.dequantize_int,
    "quantize_fp8": reference.quantize_fp8,
    "dequantize_fp8": reference.dequantize_fp8,
    "nvfp4_global_scale": reference.nvfp4_global_scale,
    "quantize_nvfp4": reference.quantize_nvfp4,
    "dequantize_nvfp4": reference.dequantize_nvfp4,
    "quantize_mxfp4": reference.quantize_mxfp4,
    "dequantize_mxfp4": reference.dequantize_mxfp4,
    "search_nvfp4": scale_search.search_nvfp4,
    "search_mxfp4": scale_search.search_mxfp4,
}

# Filled by quantize_cli.kernels.triton when Triton imports; same keys and signatures as REFERENCE. Each
# entry calls a torch.library custom op ``quanta::<key>`` (quantize_cli.kernels.library).
TRITON: dict[str, Callable[..., object]] = {}


def triton_interpreted() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, set before Python starts)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def has_triton(op: str) -> bool:
    """Whether ``op`` has a Triton kernel in this installation."""
    _load_triton()
    return op in TRITON


def resolve(op: str, backend: str, device: torch.device) -> Callable[..., object]:
    """The implementation of ``op`` for ``backend`` on ``device``.

    ``auto`` takes Triton on CUDA when it has the op, else the reference; ``triton`` forces the
    kernel (on the CPU only under ``TRITON_INTERPRET=1``); ``reference`` forces plain PyTorch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "reference":
        return REFERENCE[op]
    _load_triton()
    if backend == "auto":
        return TRITON[op] if device.type == "cuda" and op in TRITON else REFERENCE[op]
    if op not in TRITON:
        raise ValueError(f"no Triton kernel for {op} in this installation (is triton installed?)")
    if device.type != "cuda" and not triton_interpreted():
        raise ValueError("backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")
    return TRITON[op]


_triton_loaded = False


def _load_triton() -> None:
    global _triton_loaded
    if _triton_loaded:
        return
    _triton_loaded = True
    try:
        from .triton import register  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError:
        return
    register(TRITON)
