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
QuantLinearFn = Callable[[Tensor, QuantState, Tensor | None, Tensor | None], Tensor]
INT8_MAX = 127

# (device type, scheme name) -> implementation; filled by kernel modules, empty on the CPU.
_OVERRIDES: dict[tuple[str, str], QuantLinearFn] = {}


def register_quant_linear(device_type: str, scheme: str) -> Callable[[QuantLinearFn], QuantLinearFn]:
    """Decorator: use ``fn(x, state, bias, input_scale)`` instead of :func:`dequantize_linear` for ``scheme``
    on ``device_type`` (an int8 x int8 kernel takes the static ``input_scale`` of W8A8 schemes).

    ``fn`` must return what :func:`dequantize_linear` returns, to float tolerance.
    """
    name = get_scheme(scheme).name

    def register(fn: QuantLinearFn) -> QuantLinearFn:
        _OVERRIDES[(device_type, name)] = fn
        return fn

    return register


def fake_quantize_input(x: Tensor, input_scale: Tensor) -> Tensor:
    """``clamp(round(x / s), -127, 127) * s`` in fp32, back in ``x.dtype``: the int8 activations a W8A8
    matmul sees, for a static symmetric per-tensor scale ``s`` (ties to even, like the weight codes)."""
    s = input_scale.to(device=x.device, dtype=torch.float32)
    return (torch.round(x.float() / s).clamp(-INT8_MAX, INT8_MAX) * s).to(x.dtype)


def dequantize_linear(
    x: Tensor, state: QuantState, bias: Tensor | None = None, input_scale: Tensor | None = None
) -> Tensor:
    """``x @ W.T + bias`` with ``W = dequantize(state)`` cast to ``x.dtype``.

    ``x``: (..., in_features); ``state``: a quantized (out_features, in_features) weight;
    ``bias``: (out_features,) or None; ``input_scale``: a static int8 activation scale (W8A8) or None.
    Returns (..., out_features) in ``x.dtype``.
    """
    if input_scale is not None:
        x = fake_quantize_input(x, input_scale)
    weight = dequantize(state, backend="auto", dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quant_linear(x: Tensor, state: QuantState, bias: Tensor | None = None, input_scale: Tensor | None = None) -> Tensor:
    """``x @ dequantize(state).T + bias`` in ``x.dtype`` (x int8-quantized first when ``input_scale`` is
    given), by a registered kernel where there is one."""
    fn = _OVERRIDES.get((x.device.type, state.scheme), dequantize_linear)
    return fn(x, state, bias, input_scale)


@lru_cache(maxsize=64)
def codebook(scheme: str, device: torch.device) -> Tensor | None:
    """The scheme's codebook on ``device``, built once: it is a constant, never stored with the weight."""
    return get_scheme(scheme).codebook(device)
