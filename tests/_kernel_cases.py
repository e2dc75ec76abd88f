"""Cases shared by the Triton kernel tests (interpreter and GPU): every kernel-backed scheme and option."""

import torch

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
