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
    if x.device.type not in _LOADED:
        load_device_kernels(x.device.type)
    fn = _OVERRIDES.get((x.device.type, state.scheme), dequantize_linear)
    return fn(x, state, bias, input_scale)


# Device types whose kernel modules were imported (or found missing): looked up once per device type.
_LOADED: set[str] = set()


def load_device_kernels(device_type: str) -> None:
    """Register the fused kernels of ``device_type`` on first use: on CUDA, ``quantize_cli.nn.fused``
    (the Triton GEMV), skipped where Triton does not import."""
    _LOADED.add(device_type)
    if device_type != "cuda":
        return
    try:
        from . import fused  # noqa: F401, PLC0415 - registers on import; optional dependency (Triton)
    except ImportError:
        return


@lru_cache(maxsize=64)
def codebook(scheme: str, device: torch.device) -> Tensor | None:
    """The scheme's codebook on ``device``, built once: it is a constant, never stored with the weight."""
    return get_scheme(scheme).codebook(device)


# cuBLASLt's int8 GEMM behind torch._int_mm wants more than 16 rows; smaller batches are zero-padded.
_INT_MM_MIN_ROWS = 17


def int8_static_linear(
    x: Tensor, state: QuantState, bias: Tensor | None = None, input_scale: Tensor | None = None
) -> Tensor:
    """W8A8: ``x`` rounded to int8 with the static ``input_scale``, int8 x int8 -> int32 with
    ``torch._int_mm``, then ``* input_scale * row scale (+ bias)`` in fp32, returned in ``x.dtype``.

    ``state``: an ``int8-static`` weight, (out_features, in_features) int8 codes with one fp32 scale per
    row. The int32 accumulation is exact, so this equals :func:`dequantize_linear` up to fp32 rounding.
    """
    if input_scale is None:
        return dequantize_linear(x, state, bias, input_scale)
    s = input_scale.to(device=x.device, dtype=torch.float32)
    k = x.shape[-1]
    xq = torch.round(x.reshape(-1, k).float() / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    rows = xq.shape[0]
    if x.is_cuda and rows < _INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, _INT_MM_MIN_ROWS - rows))
    # qdata is (out, in) row-major, so .t() is the column-major (in, out) operand cuBLASLt takes as is.
    acc = torch._int_mm(xq, state.qdata.t())[:rows]
    y = acc.float() * (s * state.scale.reshape(1, -1).float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


register_quant_linear("cuda", "int8-static")(int8_static_linear)
