"""The CUDA paths of :func:`quantize_cli.nn.functional.quant_linear`, registered on import.

| scheme | fused (``kernels.triton.matmul``) up to ``FUSED_MAX_ROWS`` rows | more rows |
|---|---|---|
| int4 (both), int8 | ``code - zero`` decoded in registers | Triton dequantize + cuBLAS |
| nf4, fp4, nf8 | codebook lookup (the 16 / 256 values staged in shared memory) | Triton dequantize + cuBLAS |
| fp8 | E4M3 byte -> value table, likewise | Triton dequantize + cuBLAS |
| nvfp4, mxfp4 | - | Triton dequantize + cuBLAS at every batch |
| int8-static | - | ``torch._int_mm`` (``functional.int8_static_linear``) |

The limit is measured on an H100 (``benchmarks/matmul.py --sweep --crossover``, benchmarks/results.md):
for every fused scheme and 1, 2, 4 or 16 rows of both benchmark shapes the GEMV (its timed tiling:
fp32 FMAs, or ``tl.dot`` on the tensor cores for several rows) beats one dequantize pass plus cuBLAS;
above 16 rows the latter wins. fp8 weights keep their per-block
fp32 scales, which ``torch._scaled_mm`` cannot take, so fp8 runs weight-only like the others: no
activation is rounded to fp8. Blocks whose power-of-two factor is below ``matmul.MIN_SUB``, inputs that
need a gradient and float64 inputs take dequantize + ``F.linear``.

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
FUSED_MAX_ROWS = 16  # GEMV up to this many input rows (benchmarks/matmul.py --sweep --crossover)
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


def fused_linear(x: Tensor, state: QuantState, bias: Tensor | None = None, input_scale: Tensor | None = None) -> Tensor:
    """``quant_linear`` on CUDA: :func:`gemv_linear` for up to ``FUSED_MAX_ROWS`` rows of a fusable
    call, else :func:`dequantize_linear` (Triton dequantize + cuBLAS)."""
    if input_scale is not None:
        x = fake_quantize_input(x, input_scale)
    rows = x.numel() // max(1, x.shape[-1])
    if not fusable(x, state) or rows > max_rows(state):
        return dequantize_linear(x, state, bias)
    return gemv_linear(x, state, bias)


def max_rows(state: QuantState) -> int:
    """The most input rows that go through the GEMV for this weight (see the module docstring)."""
    return FUSED_MAX_ROWS


for _scheme in FUSED_SCHEMES:
    register_quant_linear("cuda", _scheme)(fused_linear)
for _scheme in DEQUANTIZE_SCHEMES:  # named so the table above is the registry's: no fused kernel (yet)
    register_quant_linear("cuda", _scheme)(dequantize_linear)
