"""Cases shared by the Triton kernel tests (interpreter and GPU): every kernel-backed scheme and option."""

import torch

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


def _padded_hessian(x: torch.Tensor, state, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded_blocks of x, the diagonal blocks of the zero-padded hessian)."""
    xb = padded_blocks(x, state)
    h = torch.nn.functional.pad(hessian.float(), (0, xb.shape[1] * xb.shape[2] - hessian.shape[0]) * 2)
    return xb, scale_search.hessian_blocks(h, state.block_size)


def ranking_errors(x: torch.Tensor, state, hessian: torch.Tensor) -> torch.Tensor:
    """Per-block error the Hessian search ranks candidates by (``scale_search.hessian_fp16``: r^T H_b r with the
    fp16 ranking codes) under the state's block scales. The stored codes are the fp32 encoding, which differs
    from the ranking codes near an E2M1 bound, so two scales whose ranking errors tie can differ by far more
    in the stored codes' error: the search is checked on what it ranks."""
    xb, hb = _padded_hessian(x, state, hessian)
    if state.scheme == "nvfp4":
        total = state.scale.float() * state.global_scale.float()
    else:
        total = torch.exp2(state.scale.float() - 127)
    return scale_search.hessian_fp16(xb, total.reshape(xb.shape[:2]), hb)


def block_energy(x: torch.Tensor, state, hessian: torch.Tensor) -> torch.Tensor:
    """Per-block x^T H_b x: the size of the terms the Triton Hessian search adds up."""
    xb, hb = _padded_hessian(x, state, hessian)
    return scale_search.hessian_error(xb, torch.zeros_like(xb), hb)


# The Triton Hessian search takes each candidate's error as t (t (k H).k - 2 (k H).x) = r^T H r - x^T H x, in fp32
# from fp16 tensor-core dots, so its rounding is of the size of x^T H x, and candidates closer than that may be
# ordered the other way than the reference's. Allowed: a kept scale whose ranking error (``ranking_errors``)
# exceeds the reference's best by at most HESSIAN_TOL * x^T H x, on at most HESSIAN_MAX_DIFFERING of the blocks
# (at least one).
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
    excess = (ranking_errors(x, tri, hessian) - ranking_errors(x, ref, hessian)) / block_energy(x, tri, hessian)
    worst = excess[differ].max().item()
    assert worst <= HESSIAN_TOL, worst
    return n, worst
