"""The one matmul a quantized Linear runs: ``quant_linear(x, state, bias)``.

The default dequantizes the packed weight on the fly and calls ``F.linear``. A fused kernel (a CUDA
dequant-GEMV, ``torch._int_mm`` for int8, ...) plugs in with :func:`register_quant_linear` for a
(device type, scheme) pair; ``QuantLinear.forward`` never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..api import dequantize
from ..kernels.ops import resolve
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
    given), by a registered kernel where there is one; fp8 weights inside :func:`fp8_activations` take
    :func:`fp8_activation_linear` (activations rounded to fp8 too)."""
    if x.device.type not in _LOADED:
        load_device_kernels(x.device.type)
    if _FP8_ACTIVATIONS[0] and state.scheme == "fp8" and input_scale is None:
        return fp8_activation_linear(x, state, bias)
    fn = _OVERRIDES.get((x.device.type, state.scheme), dequantize_linear)
    return fn(x, state, bias, input_scale)


# ---- W8A8 fp8 (opt-in) --------------------------------------------------------------------------------------

F8_MAX = 448.0
FP8_MM_BLOCK = 128  # the 1x128 blockwise recipe of torch._scaled_mm (cuBLASLt, Hopper, CUDA >= 12.9)
_FP8_ACTIVATIONS = [False]
_SCALED_MM_FAILED: set[torch.device] = set()  # devices whose torch._scaled_mm refused the blockwise recipe


@contextmanager
def fp8_activations(enabled: bool = True) -> Iterator[None]:
    """Inside the block, fp8 weights also round their inputs to fp8 (W8A8, dynamic scales): each group of
    ``block_size`` input columns of each row gets scale amax / 448, and on a Hopper GPU the product runs
    in fp8 on the tensor cores through ``torch._scaled_mm`` (its 1x128 x 1x128 blockwise recipe, block 128,
    fp16/bf16 inputs); elsewhere the same rounding is emulated in fp32. Outside it fp8 stays weight-only."""
    before = _FP8_ACTIVATIONS[0]
    _FP8_ACTIVATIONS[0] = enabled
    try:
        yield
    finally:
        _FP8_ACTIVATIONS[0] = before


def quantize_fp8_groups(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """(M, K) with K a multiple of ``group`` -> (float8_e4m3fn codes (M, K), fp32 scales (M, K // group)):
    the fp8 scheme's own quantizer on the activations (``x / s`` rounded to E4M3, ``s = amax / 448`` per
    group of ``group`` columns; 0 for an all-zero group), its Triton kernel on CUDA."""
    return resolve("quantize_fp8", "auto", x.device)(x, group)


def fp8_activation_linear(x: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    """W8A8 fp8: ``x`` rounded by :func:`quantize_fp8_groups` in groups of the weight's block, times the fp8
    weight, fp32 accumulation, ``(+ bias)``; returned in ``x.dtype``. ``torch._scaled_mm`` where the device
    takes the blockwise recipe (:func:`scaled_mm_fits`), else the same numbers through an fp32 matmul
    (:func:`fp8_emulated_matmul`)."""
    k = x.shape[-1]
    kp = state.qdata.shape[1]
    x2 = x.reshape(-1, k)
    if kp != k:
        x2 = F.pad(x2, (0, kp - k))  # the weight's padding columns are zero codes
    xq, sx = quantize_fp8_groups(x2, state.block_size)
    y = None
    if scaled_mm_fits(x, state):
        try:
            y = _scaled_mm_blockwise(xq, sx, state)
        except RuntimeError:  # this torch / cuBLASLt / GPU does not take the recipe after all
            _SCALED_MM_FAILED.add(x.device)
    if y is None:
        y = fp8_emulated_matmul(xq, sx, state)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def scaled_mm_fits(x: Tensor, state: QuantState) -> bool:
    """Whether ``torch._scaled_mm``'s 1x128 blockwise recipe can take this call: CUDA, compute capability
    9.x (the recipe is Hopper's), fp16/bf16 input, block 128, out_features a multiple of 16."""
    return (
        x.is_cuda
        and x.device not in _SCALED_MM_FAILED
        and torch.cuda.get_device_capability(x.device)[0] == 9
        and x.dtype in (torch.float16, torch.bfloat16)
        and state.block_size == FP8_MM_BLOCK
        and state.qdata.shape[0] % 16 == 0
    )


def _scaled_mm_blockwise(xq: Tensor, sx: Tensor, state: QuantState) -> Tensor:
    """fp32 (M, N) from cuBLASLt's fp8 GEMM with 1x128 scales on both operands (rows padded to 16)."""
    rows = xq.shape[0]
    pad = -rows % 16
    if pad:
        xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
        sx = F.pad(sx, (0, 0, 0, pad), value=1.0)
    scale_a = sx.t().contiguous().t()  # (M, K / 128), M-major as the recipe wants
    scale_b = state.scale.float().t().contiguous()  # (K / 128, N) for the (K, N) column-major operand
    y = torch._scaled_mm(xq, state.qdata.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    return y[:rows]


def fp8_emulated_matmul(xq: Tensor, sx: Tensor, state: QuantState) -> Tensor:
    """The fp8 x fp8 product in fp32 (exact operands, fp32 accumulation): the reference the GPU path
    is tested against, and the path everywhere else."""
    m, kp = xq.shape
    group = kp // sx.shape[1]
    xd = (xq.float().reshape(m, -1, group) * sx.unsqueeze(-1)).reshape(m, kp)
    n = state.qdata.shape[0]
    w = (state.qdata.float().reshape(n, -1, group) * state.scale.float().unsqueeze(-1)).reshape(n, kp)
    return xd @ w.t()


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
