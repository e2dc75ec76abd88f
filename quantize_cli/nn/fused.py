"""The CUDA paths of :func:`quantize_cli.nn.functional.quant_linear`, registered on import.

| scheme | fused kernel (``kernels.triton.matmul``) | or |
|---|---|---|
| int4 (both), int8 | ``code - zero`` decoded in registers | Triton dequantize + cuBLAS |
| nf4, fp4, nf8 | codebook lookup (the 16 / 256 values staged in shared memory) | Triton dequantize + cuBLAS |
| fp8 | E4M3 byte -> value table, likewise | Triton dequantize + cuBLAS |
| nvfp4, mxfp4 | - | Triton dequantize + cuBLAS at every batch |
| int8-static | - | ``torch._int_mm`` (``functional.int8_static_linear``) |

The fused kernel is a GEMV for up to 16 input rows (fp32 FMAs, or ``tl.dot`` for several rows) and a
GEMM on the tensor cores (64 or 128 rows per program) for more. Which path a call takes is measured, not
assumed: the first call of each (weight, row count rounded up to a power of two) times both in CUDA
graphs and keeps the faster (:func:`fused_wins`); where nothing can be timed (the interpreter, inside
a graph capture) the GEMV takes up to ``FUSED_MAX_ROWS`` rows, the limit the H100 crossover measured
(``benchmarks/matmul.py --sweep --crossover``, benchmarks/results.md). fp8 weights run weight-only here;
inside ``functional.fp8_activations()`` they round their inputs to fp8 as well and multiply through
``torch._scaled_mm`` (``functional.fp8_activation_linear``). Blocks whose power-of-two factor is below
``matmul.MIN_SUB``, inputs that need a gradient and float64 inputs take dequantize + ``F.linear``.

Importing this module imports Triton (ImportError without it); ``quant_linear`` does so on its first
CUDA call. :func:`gemv_linear` runs the kernel on any device Triton runs on (the CPU under
``TRITON_INTERPRET=1``), which is how the tests reach it without a GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from ..kernels.triton import matmul
from ..schemes import QuantState, get_scheme
from .functional import dequantize_linear, fake_quantize_input, register_quant_linear

Tensor = torch.Tensor

FUSED_SCHEMES = ("nf4", "fp4", "nf8", "int4", "int8", "fp8")
DEQUANTIZE_SCHEMES = ("nvfp4", "mxfp4")
FUSED_MAX_ROWS = 16  # untimed default: the GEMV up to this many rows (benchmarks/matmul.py --sweep --crossover)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=8)
def fp8_table(device: torch.device) -> Tensor:
    """The 256 float8_e4m3fn values by byte, fp32 (0x7F and 0xFF are NaN; quantize never writes them)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def decode_args(state: QuantState) -> dict[str, Any]:
    """How ``matmul.quant_matmul`` decodes ``state``'s codes: ``codes``, ``bits`` and ``lut`` or
    ``offset``/``zero_point``, read off the state (codebook, code dtype, zero point)."""
    bits = get_scheme(state.scheme).bits
    qdata = state.qdata
    if state.codebook is not None:
        lut = state.codebook.to(device=qdata.device, dtype=torch.float32).contiguous()
        return {"codes": qdata, "bits": bits, "lut": lut}
    if qdata.dtype == torch.float8_e4m3fn:
        return {"codes": qdata.view(torch.uint8), "bits": bits, "lut": fp8_table(qdata.device)}
    offset = 8 if bits == 4 and state.zero_point is None else 0  # symmetric int4 stores q + 8
    return {"codes": qdata, "bits": bits, "offset": offset, "zero_point": state.zero_point}


def fusable(x: Tensor, state: QuantState) -> bool:
    """Whether :func:`gemv_linear` can take this call (else dequantize + ``F.linear``)."""
    return (
        state.scheme in FUSED_SCHEMES
        and len(state.shape) == 2
        and state.block_size is not None
        and matmul.supports(state.block_size)
        and x.dtype in _FLOATS
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def gemv_linear(
    x: Tensor, state: QuantState, bias: Tensor | None = None, config: matmul.GemvConfig | None = None
) -> Tensor:
    """``x @ dequantize(state).T + bias`` through the fused Triton kernel, whatever the batch.

    ``x``: (..., in_features) fp32/fp16/bf16; ``state``: a (out_features, in_features) weight of a
    scheme in ``FUSED_SCHEMES``; ``config``: a tiling (None: timed on a GPU, see ``kernels.triton.matmul``).
    Returns (..., out_features) in ``x.dtype``.
    """
    out_features, in_features = state.shape
    x2 = x.reshape(-1, in_features)
    y = matmul.quant_matmul(
        x2, scale=state.scale, block_size=state.block_size, bias=bias, config=config, **decode_args(state)
    )
    return y.reshape(*x.shape[:-1], out_features)


# (scheme, shape, block, zero point, rows rounded up to a power of two, dtype, device) -> the fused kernel won.
_FUSED_WINS: dict[tuple, bool] = {}
_FUSED_TIMES: dict[tuple, tuple[float, float]] = {}  # same keys -> (fused µs, dequantize + cuBLAS µs)


def fused_wins(x: Tensor, state: QuantState, bias: Tensor | None) -> bool:
    """Whether the fused kernel (:func:`gemv_linear`: the GEMV for a few rows, the tensor-core GEMM for
    many) is the faster path for this weight and row count, rounded up to a power of two. On a GPU the
    first call of each times both paths in CUDA graphs (``matmul.device_us``; the fused kernel with its
    own tuned tiling) and keeps the answer, so neither path is taken where the other is faster. Where
    nothing can be timed (the interpreter, inside a graph capture) the rule is the measured default:
    the fused kernel up to ``max_rows`` rows."""
    rows = x.numel() // x.shape[-1]
    bucket = 1 << max(0, rows - 1).bit_length()
    key = (state.scheme, tuple(state.shape), state.block_size, state.zero_point is not None, bucket, x.dtype, x.device)
    won = _FUSED_WINS.get(key)
    if won is None:
        if not matmul.can_time(x):
            return rows <= max_rows(state)
        fused = matmul.device_us(lambda: gemv_linear(x, state, bias), x.device)
        deq = matmul.device_us(lambda: dequantize_linear(x, state, bias), x.device)
        _FUSED_TIMES[key] = (fused, deq)
        won = _FUSED_WINS[key] = fused <= deq
    return won


def fused_choices() -> dict[tuple, bool]:
    """The timed path choices so far (a copy), keyed as ``fused_wins`` keys them."""
    return dict(_FUSED_WINS)


def fused_timings() -> dict[tuple, tuple[float, float]]:
    """(fused kernel µs, dequantize + cuBLAS µs) behind each timed choice (a copy)."""
    return dict(_FUSED_TIMES)


def fused_linear(x: Tensor, state: QuantState, bias: Tensor | None = None, input_scale: Tensor | None = None) -> Tensor:
    """``quant_linear`` on CUDA: :func:`gemv_linear` where it is the faster path (:func:`fused_wins`),
    else :func:`dequantize_linear` (Triton dequantize + cuBLAS)."""
    if input_scale is not None:
        x = fake_quantize_input(x, input_scale)
    if fusable(x, state) and fused_wins(x, state, bias):
        return gemv_linear(x, state, bias)
    return dequantize_linear(x, state, bias)


def max_rows(state: QuantState) -> int:
    """The most input rows that go through the GEMV for this weight where no path is timed (see the
    module docstring)."""
    return FUSED_MAX_ROWS


for _scheme in FUSED_SCHEMES:
    register_quant_linear("cuda", _scheme)(fused_linear)
for _scheme in DEQUANTIZE_SCHEMES:  # named so the table above is the registry's: no fused kernel (yet)
    register_quant_linear("cuda", _scheme)(dequantize_linear)
