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
    """Reference per-block error r^T H_b r (scale_search.hessian_error) of a quantized state."""
    xb = padded_blocks(x, state)
    dq = dequantize(state, backend="reference").float().reshape(xb.shape[0], -1)
    dq = torch.nn.functional.pad(dq, (0, xb.shape[1] * xb.shape[2] - dq.shape[1])).reshape(xb.shape)
    h = torch.nn.functional.pad(hessian.float(), (0, xb.shape[1] * xb.shape[2] - hessian.shape[0]) * 2)
    return scale_search.hessian_error(xb, dq, scale_search.hessian_blocks(h, state.block_size))


def block_energy(x: torch.Tensor, state, hessian: torch.Tensor) -> torch.Tensor:
    """Per-block x^T H_b x: the size of the terms the Triton Hessian search adds up."""
    xb = padded_blocks(x, state)
    h = torch.nn.functional.pad(hessian.float(), (0, xb.shape[1] * xb.shape[2] - hessian.shape[0]) * 2)
    return scale_search.hessian_error(xb, torch.zeros_like(xb), scale_search.hessian_blocks(h, state.block_size))


# The Triton Hessian search takes each candidate's error as t (t (k H).k - 2 (k H).x) = r^T H r - x^T H x, in fp32
# from bf16 tensor-core dots, so its rounding is of the size of x^T H x, and candidates closer than that may be
# ordered the other way than the reference's r^T H r. Allowed: a kept scale whose reference error exceeds the
# reference's best by at most HESSIAN_TOL * x^T H x, on at most HESSIAN_MAX_DIFFERING of the blocks (at least one).
HESSIAN_TOL = 2.0**-18
HESSIAN_MAX_DIFFERING = 0.01


def check_hessian_choice(x: torch.Tensor, tri, ref, hessian: torch.Tensor) -> tuple[int, float]:
    """Assert the bounds above for a Triton and a reference Hessian search of x; return (blocks whose scale
    differs, the largest excess error over x^T H x among them)."""
    differ = bits(tri.scale) != bits(ref.scale)
    n = int(differ.sum().item())
    assert n <= max(1, int(HESSIAN_MAX_DIFFERING * differ.numel())), f"{n} of {differ.numel()} scales differ"
    if not n:
        return 0, 0.0
    excess = (block_errors(x, tri, hessian) - block_errors(x, ref, hessian)) / block_energy(x, tri, hessian)
    worst = excess[differ].max().item()
    assert worst <= HESSIAN_TOL, worst
    return n, worst
