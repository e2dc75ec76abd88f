"""The one matmul a quantized Linear runs: ``quant_linear(x, state, bias)``.

The default dequantizes the packed weight on the fly and calls ``F.linear``. A fused kernel (a CUDA
dequant-GEMV, ``torch._int_mm`` for int8, ...) plugs in with :func:`register_quant_linear` for a
(device type, scheme) pair; ``QuantLinear.forward`` never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..api import dequantize
from ..schemes import QuantState, get_scheme

Tensor = torch.Tensor
QuantLinearFn = Callable[[Tensor, QuantState, Tensor | None], Tensor]

# (device type, scheme name) -> implementation; filled by kernel modules, empty on the CPU.
_OVERRIDES: dict[tuple[str, str], QuantLinearFn] = {}


def register_quant_linear(device_type: str, scheme: str) -> Callable[[QuantLinearFn], QuantLinearFn]:
    """Decorator: use ``fn(x, state, bias)`` instead of dequantize + ``F.linear`` for ``scheme`` on ``device_type``.

    ``fn`` must return what :func:`dequantize_linear` returns, to float tolerance.
    """
    name = get_scheme(scheme).name

    def register(fn: QuantLinearFn) -> QuantLinearFn:
        _OVERRIDES[(device_type, name)] = fn
        return fn

    return register


def dequantize_linear(x: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` with ``W = dequantize(state)`` cast to ``x.dtype``.

    ``x``: (..., in_features); ``state``: a quantized (out_features, in_features) weight;
    ``bias``: (out_features,) or None. Returns (..., out_features) in ``x.dtype``.
    """
    weight = dequantize(state, backend="auto", dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quant_linear(x: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    """``x @ dequantize(state).T + bias`` in ``x.dtype``, by a registered kernel where there is one."""
    fn = _OVERRIDES.get((x.device.type, state.scheme), dequantize_linear)
    return fn(x, state, bias)


@lru_cache(maxsize=64)
def codebook(scheme: str, device: torch.device) -> Tensor | None:
    """The scheme's codebook on ``device``, built once: it is a constant, never stored with the weight."""
    return get_scheme(scheme).codebook(device)
