"""Cases shared by the Triton kernel tests (interpreter and GPU): every kernel-backed scheme and option."""

import torch

from quantize_cli import dequantize
from quantize_cli.kernels import scale_search

SCHEMES: list[tuple[str, dict]] = [
    ("nf4", {}),
    ("fp4", {}),
    ("nf8", {}),
    ("int8", {}),
    ("int4", {}),
    ("int4", {"symmetric": False}),
    ("fp8", {}),
    ("nvfp4", {}),
    ("mxfp4", {}),
]
SCHEME_IDS = [name + ("-asym" if opts else "") for name, opts in SCHEMES]


def bits(t: torch.Tensor | None) -> torch.Tensor | None:
    """Exact comparison view: float8 as its bytes (torch.equal on float8 is not bitwise everywhere)."""
    if t is None:
        return None
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def padded_blocks(x: torch.Tensor, state) -> torch.Tensor:
    """x as the scheme quantized it: (rows, blocks, block_size) fp32, zero-padded."""
    rows, width = state.qdata.shape
    x2 = x.reshape(rows, -1).float()
    return torch.nn.functional.pad(x2, (0, 2 * width - x2.shape[1])).reshape(rows, -1, state.block_size)


def block_errors(x: torch.Tensor, state, hessian: torch.Tensor) -> torch.Tensor:
    """Reference per-block error r^T H_b r (scale_search.block_error) of a quantized state."""
    xb = padded_blocks(x, state)
    dq = dequantize(state, backend="reference").float().reshape(xb.shape[0], -1)
    dq = torch.nn.functional.pad(dq, (0, xb.shape[1] * xb.shape[2] - dq.shape[1])).reshape(xb.shape)
    h = torch.nn.functional.pad(hessian.float(), (0, xb.shape[1] * xb.shape[2] - hessian.shape[0]) * 2)
    return scale_search.block_error(xb, dq, scale_search.hessian_blocks(h, state.block_size))
