"""Scale-selection methods shared by the E2M1 schemes (NVFP4, MXFP4): naive, sse, hessian."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from ..kernels.scale_search import hessian_blocks
from .base import Tensor

METHODS = ("naive", "sse", "hessian")


def method_of(options: dict[str, Any]) -> str:
    """The ``method`` option, checked; ``hessian`` needs a ``hessian=`` (cols, cols) X^T X."""
    method = options.get("method", "naive")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "hessian" and options.get("hessian") is None:
        raise ValueError("method 'hessian' needs calibration statistics (hessian=X^T X of the layer input)")
    return method


def padded_hessian_blocks(options: dict[str, Any], x: Tensor, block_size: int) -> Tensor | None:
    """Diagonal blocks of the ``hessian`` option for the padded input ``x`` (None unless method is hessian).

    Padded columns get zero rows and columns: their (zero) weights carry no error weight.
    """
    if method_of(options) != "hessian":
        return None
    h = options["hessian"].to(device=x.device)
    cols = x.shape[1]
    if h.shape[0] > cols or h.shape != (h.shape[0], h.shape[0]):
        raise ValueError(
            f"hessian must be (in_features, in_features) for a weight of {cols} columns, got {tuple(h.shape)}"
        )
    pad = cols - h.shape[0]
    return hessian_blocks(F.pad(h.float(), (0, pad, 0, pad)), block_size)
