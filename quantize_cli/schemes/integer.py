"""Linear integer schemes: int8 (symmetric) and int4 (symmetric, or asymmetric with a zero point)."""

from __future__ import annotations

from typing import Any

from ..kernels.ops import resolve
from .base import Quantized, QuantState, Scheme, Tensor


def _int_scheme(
    name: str,
    bits: int,
    block: int | None,
    alias: str | None,
    description: str,
    options: tuple[str, ...],
    calibrated: bool = False,
):
    def quantize(x: Tensor, block_size: int, backend: str, opts: dict[str, Any]) -> Quantized:
        symmetric = bool(opts.get("symmetric", True))
        qdata, scale, zero = resolve("quantize_int", backend, x.device)(x, block_size, bits, symmetric)
        return Quantized(qdata, scale, None, zero)

    def dequantize(state: QuantState, backend: str) -> Tensor:
        fn = resolve("dequantize_int", backend, state.qdata.device)
        return fn(state.qdata, state.scale, state.zero_point, state.block_size, bits, state.dtype)

    return Scheme(
        name=name,
        bits=bits,
        default_block_size=block,
        quantize_fn=quantize,
        dequantize_fn=dequantize,
        description=description,
        aliases=(alias,) if alias else (),
        needs_calibration=calibrated,
        per_row=calibrated,
        kernel_ops=("quantize_int", "dequantize_int"),
        options=options,
    )


INT8 = _int_scheme("int8", 8, 64, "int8_linear", "int8 symmetric, round(x / s), s = absmax / 127 per block", ())
INT4 = _int_scheme(
    "int4",
    4,
    128,
    "int4_linear",
    "int4 symmetric [-7, 7] per group; symmetric=False: [0, 15] with a uint8 zero point",
    ("symmetric",),
)
# W8A8: int8 weights with one scale per output row, plus a static int8 activation scale per Linear from
# calibration (stored as ``P.input_scale`` by the pipeline), so a Linear can run int8 x int8 -> int32.
INT8_STATIC = _int_scheme(
    "int8-static",
    8,
    None,
    None,
    "W8A8: int8 weights, fp32 scale per output row, static int8 activation scale from calibration",
    (),
    calibrated=True,
)
