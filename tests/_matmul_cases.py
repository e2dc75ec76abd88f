"""Cases and the error bound shared by the fused-matmul tests (interpreter and GPU).

Tolerance, per output element, from the arithmetic rather than guessed: with S = |x| @ |W|.T + |b|,
|y - ref| <= (u_w + K * 2**-24) * S + u_y * |ref|. ``K * 2**-24`` bounds any fp32 summation order over K
terms; ``u_w`` is 0 where the weight is decoded and multiplied in fp32 (one input row, or fp32 input)
and the input dtype's epsilon where the tensor-core path rounds the decoded weight to it first (as
``dequantize(..., dtype=x.dtype)`` does; epsilon, not half of it, because the interpreter truncates
to bf16); ``u_y`` is the rounding of the output to the input dtype (half its epsilon).
"""

from __future__ import annotations

import torch
from _kernel_cases import SCHEMES

# every kernel-backed scheme but the FP4 formats, which dequantize + cuBLAS (nn.fused.DEQUANTIZE_SCHEMES)
FUSED = [(name, opts) for name, opts in SCHEMES if name not in ("nvfp4", "mxfp4")]
FUSED_IDS = [name + ("-asym" if opts else "") for name, opts in FUSED]


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``x @ w.T + b`` (w: the dequantized weight)."""
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()


def assert_within_bound(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rounded_weight: bool
) -> None:
    """``y`` (in x's dtype) equals the fp32 reference within the bound of the module docstring."""
    ref = reference(x, w, bias)
    s = x.float().abs() @ w.float().abs().T
    if bias is not None:
        s = s + bias.float().abs()
    eps = torch.finfo(x.dtype).eps
    u_w = eps if rounded_weight and x.dtype != torch.float32 else 0.0
    u_y = eps / 2 if x.dtype != torch.float32 else 0.0
    bound = (u_w + x.shape[-1] * 2.0**-24) * s + u_y * ref.abs() + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the bound by {worst:.2f}x"
