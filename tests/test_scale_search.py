"""SSE- and Hessian-optimal NVFP4/MXFP4 block scales against a slow per-block brute force."""

import pytest
import torch

from quantize_cli import dequantize, quantize
from quantize_cli.kernels import reference, scale_search


def _brute_force_nvfp4(x: torch.Tensor, gs: float, h: torch.Tensor | None) -> list[int]:
    """Per block, the E4M3 bit pattern among the candidate window with the least float64 error."""
    chosen = []
    for block in x.reshape(-1, 16).double():
        naive = torch.tensor(min(block.abs().max().item() / 6 / gs, 448.0)).to(torch.float8_e4m3fn)
        best = None
        for step in scale_search.NVFP4_STEPS:
            bits = min(max(int(naive.view(torch.uint8)) + step, 0), 0x7E)
            s = torch.tensor(bits, dtype=torch.uint8).view(torch.float8_e4m3fn).double().item() * gs
            q = reference.e2m1_decode(reference.e2m1_encode((block / s).float() if s else block.float() * 0))
            r = block - q.double() * s
            err = (r @ h @ r).item() if h is not None else (r @ r).item()
            if best is None or err < best[0] - 1e-12 * max(1.0, abs(best[0])):
                best = (err, bits)
        chosen.append(best[1])
    return chosen


@pytest.mark.parametrize("use_hessian", [False, True])
def test_nvfp4_search_matches_brute_force(use_hessian: bool) -> None:
    x = torch.randn(6, 64) * torch.linspace(0.1, 3, 64)
    gs = reference.nvfp4_global_scale(x)
    h = None
    if use_hessian:
        a = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(0.2, 2, 16, dtype=torch.float64)
        h = a.T @ a  # one shared 16 x 16 block: H = blockdiag(h, h, h, h)
    hb = None if h is None else h.float().expand(4, 16, 16).contiguous()
    _, scale8 = scale_search.search_nvfp4(x, 16, gs, hb)
    got = scale8.view(torch.uint8).reshape(-1).tolist()
    expected = _brute_force_nvfp4(x, gs.item(), h)
    # float32 vs float64 error sums may disagree only on near-exact ties
    assert sum(g != e for g, e in zip(got, expected, strict=True)) <= 1


def test_hessian_identity_equals_sse() -> None:
    x = torch.randn(8, 96)
    a = quantize(x, "nvfp4", method="sse")
    b = quantize(x, "nvfp4", method="hessian", hessian=torch.eye(96))
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_search_never_worse_than_naive_per_block(scheme: str) -> None:
    x = torch.randn(32, 256) ** 3  # heavy tails make clipping worth it
    block = 16 if scheme == "nvfp4" else 32
    naive = dequantize(quantize(x, scheme)) - x
    sse = dequantize(quantize(x, scheme, method="sse")) - x
    per_block = lambda r: (r.reshape(32, -1, block) ** 2).sum(-1)  # noqa: E731
    assert torch.all(per_block(sse) <= per_block(naive) * (1 + 1e-6))
    assert per_block(sse).sum() < per_block(naive).sum() * 0.97


def test_hessian_cuts_output_error() -> None:
    # Inputs with very unequal channel scales: the Hessian method should favour the loud channels.
    x_cal = torch.randn(512, 128) * torch.logspace(-1, 1, 128)
    w = torch.randn(64, 128)
    h = x_cal.T @ x_cal

    def out_err(state) -> float:
        dw = dequantize(state) - w
        return float(torch.linalg.norm(x_cal @ dw.T) / torch.linalg.norm(x_cal @ w.T))

    naive = out_err(quantize(w, "nvfp4"))
    sse = out_err(quantize(w, "nvfp4", method="sse"))
    hess = out_err(quantize(w, "nvfp4", method="hessian", hessian=h))
    assert hess < sse and hess < naive


def test_method_errors() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        quantize(torch.randn(4, 32), "nvfp4", method="gptq")
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(torch.randn(4, 32), "mxfp4", method="hessian")
    with pytest.raises(ValueError, match="hessian must be"):
        quantize(torch.randn(4, 32), "nvfp4", method="hessian", hessian=torch.eye(40))
