"""On a CUDA GPU: the Triton kernels equal the reference bit for bit on large weights, including shapes
the block does not divide, rows wider than one tile, a tensor past 2**31 elements, and bitsandbytes'
own CUDA nf4/fp4 codes. Skipped without CUDA (CI has none; run with ``pytest tests/test_gpu_kernels.py``
on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import SCHEME_IDS as IDS
from _kernel_cases import SCHEMES, check_hessian_choice, padded_blocks
from _kernel_cases import bits as _bits

from quantize_cli import dequantize, quantize
from quantize_cli.kernels import ops, reference
from quantize_cli.kernels.constants import NF4_CODEBOOK, codebook_search_tables, codebook_tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")


def _assert_equal_states(a, b, label: str) -> None:
    for field in ("qdata", "scale", "global_scale", "zero_point"):
        x, y = _bits(getattr(a, field)), _bits(getattr(b, field))
        assert (x is None) == (y is None), f"{label} {field}"
        if x is not None:
            y = y.to(x.device)
            assert x.dtype == y.dtype and x.shape == y.shape, f"{label} {field}"
            assert torch.equal(x, y), f"{label} {field}: {(x != y).sum().item()} of {x.numel()} differ"


def assert_same_state(x: torch.Tensor, scheme: str, block_size: int | None = None, **opts) -> None:
    ref = quantize(x, scheme, block_size=block_size, backend="reference", **opts)
    tri = quantize(x, scheme, block_size=block_size, backend="triton", **opts)
    _assert_equal_states(tri, ref, scheme)
    out_tri, out_ref = dequantize(tri, backend="triton"), dequantize(ref, backend="reference")
    assert out_tri.dtype == x.dtype and out_tri.shape == x.shape
    assert torch.equal(out_tri, out_ref), f"{scheme} dequantize: {(out_tri != out_ref).sum().item()} differ"


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=g) * 0.02
    x.reshape(-1)[:4096] = 0.0  # all-zero blocks
    x.reshape(-1)[5000:5064] *= 1e4  # an outlier block
    return x.to(dtype)


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=IDS)
@pytest.mark.parametrize(
    "shape", [(4096, 11008), (4097, 11000), (8, 513, 1000), (14336, 4096)], ids=lambda s: "x".join(map(str, s))
)
def test_large_fp16(scheme: str, opts: dict, shape: tuple[int, ...]) -> None:
    assert_same_state(_weights(shape, torch.float16), scheme, **opts)


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_fp32_bf16_padded(scheme: str, opts: dict, dtype: torch.dtype) -> None:
    assert_same_state(_weights((1031, 4100), dtype, seed=1), scheme, **opts)


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=IDS)
def test_per_row_scale_on_wide_rows(scheme: str, opts: dict) -> None:
    """One block per 11008-wide row: wider than one tile, so statistics and encoding run in chunks."""
    assert_same_state(_weights((96, 11008), torch.bfloat16, seed=2), scheme, block_size=11008, **opts)


@pytest.mark.parametrize(("scheme", "opts"), SCHEMES, ids=IDS)
def test_matches_the_cpu_definition(scheme: str, opts: dict) -> None:
    """Triton on the GPU equals the reference run on the CPU (the definition), not only on CUDA."""
    x = _weights((257, 1000), torch.float16, seed=3)
    tri = quantize(x, scheme, backend="triton", **opts)
    ref = quantize(x.cpu(), scheme, backend="reference", **opts)
    _assert_equal_states(tri, ref, scheme)
    assert torch.equal(dequantize(tri, backend="triton").cpu(), dequantize(ref, backend="reference"))


@pytest.mark.parametrize(("name", "bits"), [("quantize_codebook", 4), ("quantize_int", 8)])
def test_past_2_to_the_31_elements(name: str, bits: int) -> None:
    """Offsets are 64-bit: the last rows of a 2**31 + 2 * 2048 element tensor are right."""
    rows, cols = 2**20 + 2, 2048
    x = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
    tail = x[-3:].clone()
    if name == "quantize_codebook":
        cb = codebook_tensor(NF4_CODEBOOK, "cuda")
        q, s = ops.resolve(name, "triton", x.device)(x, 64, cb, True)
        q_ref, s_ref = reference.quantize_codebook(tail, 64, cb, True)
    else:
        q, s, _ = ops.resolve(name, "triton", x.device)(x, 64, bits, True)
        q_ref, s_ref, _ = reference.quantize_int(tail, 64, bits, True)
    assert torch.equal(q[-3:], q_ref) and torch.equal(s[-3:], s_ref)


def test_auto_backend_uses_triton_on_cuda() -> None:
    assert ops.resolve("quantize_fp8", "auto", torch.device("cuda")) is torch.ops.quanta.quantize_fp8


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_equals_bitsandbytes_cuda(quant_type: str, dtype: torch.dtype) -> None:
    """nf4/fp4 from Triton against bitsandbytes' own CUDA kernels on a 4096 x 11008 weight.

    Our definition is bitsandbytes' CPU path (``tests/test_bitsandbytes_equality.py``: bit-identical).
    Its CUDA kernel differs from that path in three places, all allowed here and nowhere else:
    an all-zero block (CUDA scales by 1 / 0 and returns code 0, value -1 * 0); fp4's two zero codes
    (CUDA searches |v| and adds the sign, so a tiny positive v gets code 0 and a tiny negative one
    code 8, the CPU path the reverse; both decode to 0); and v within 32 ulps of a decision bound
    (CUDA's fp4 bounds are short decimal literals, e.g. 0.583333f for the midpoint 0.58333334, and a
    negative tie rounds towards 0). Absmax must be equal, and every other code and dequantized value
    bit-identical. Measured on an H100 (bitsandbytes 0.50.2): nf4 fp16/bf16 0 codes differ, nf4 fp32
    5 (all at a bound), fp4 about 243,500 zero-code pairs plus 15 to 28,858 at a bound."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    x = _weights((4096, 11008), dtype, seed=4)
    q_bnb, state = bnb.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    ours = quantize(x, quant_type, block_size=64, backend="triton")
    assert torch.equal(ours.scale.reshape(-1), state.absmax)
    a = reference.unpack_4bit(ours.qdata.reshape(-1, 32))
    b = reference.unpack_4bit(q_bnb.reshape(-1, 32))
    absmax = state.absmax.reshape(-1, 1)
    v = x.float().reshape(-1, 64) * (1.0 / absmax.clamp(min=1e-38))
    diff = (a != b) & (absmax > 0)
    zero_pair = ((a == 0) & (b == 8)) | ((a == 8) & (b == 0)) if quant_type == "fp4" else torch.zeros_like(diff)
    bounds, _ = codebook_search_tables(ours.codebook)
    vd = v[diff]
    ulp = (torch.nextafter(vd.abs(), torch.full_like(vd, 2.0)) - vd.abs()).clamp(min=2.0**-126)
    near = torch.zeros_like(diff)
    near[diff] = ((vd[:, None] - bounds[None, :]).abs().amin(dim=1) <= 32 * ulp) if vd.numel() else near[diff]
    unexplained = diff & ~zero_pair & ~near
    print(
        f"{quant_type} {dtype}: {diff.sum().item()} codes differ of {diff.numel()}: "
        f"{(diff & zero_pair).sum().item()} zero-code pairs, {(diff & near & ~zero_pair).sum().item()} at a bound"
    )
    assert unexplained.sum().item() == 0, v[unexplained][:8].tolist()
    out, out_bnb = dequantize(ours, backend="triton").reshape(-1, 64), bnb.dequantize_4bit(q_bnb, state).reshape(-1, 64)
    same = ~(diff & near)
    assert torch.equal(out[same], out_bnb[same])


# ---- NVFP4 / MXFP4 block-scale searches ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(4096, 11008), (4097, 11000), (14336, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_search_sse_large(scheme: str, shape: tuple[int, int]) -> None:
    """SSE search: codes, scales and dequantized output bit-identical to the reference on CUDA."""
    assert_same_state(_weights(shape, torch.float16), scheme, method="sse")


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_search_sse_fp32_bf16_and_the_cpu_definition(scheme: str, dtype: torch.dtype) -> None:
    x = _weights((1031, 4100), dtype, seed=5)
    assert_same_state(x, scheme, method="sse")
    tri = quantize(x, scheme, method="sse", backend="triton")
    _assert_equal_states(tri, quantize(x.cpu(), scheme, method="sse", backend="reference"), scheme)


def _calibration_hessian(cols: int, seed: int = 6) -> torch.Tensor:
    """X^T X / n of activations with unequal channel scales, correlated neighbours and a few outliers."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(2048, cols, device="cuda", generator=g) * torch.logspace(-1, 1, cols, device="cuda")
    a = a + 0.5 * torch.roll(a, 1, dims=1)
    a[:, :: max(1, cols // 16)] *= 20.0
    return a.T @ a / a.shape[0]


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1031, 4100)], ids=lambda s: "x".join(map(str, s)))
def test_search_hessian_large(scheme: str, shape: tuple[int, int]) -> None:
    """Hessian search: scales equal the reference's except on near-tied blocks (``check_hessian_choice``: a
    bounded fraction, each within rounding of x^T H x of the reference's best error); codes are the reference
    encoding under the kernel's scales."""
    x = _weights(shape, torch.float16, seed=7)
    h = _calibration_hessian(shape[1])
    ref = quantize(x, scheme, method="hessian", hessian=h, backend="reference")
    tri = quantize(x, scheme, method="hessian", hessian=h, backend="triton")
    xb = padded_blocks(x, tri)
    if scheme == "nvfp4":
        assert torch.equal(tri.global_scale, ref.global_scale)
        total = tri.scale.float() * tri.global_scale.float()
    else:
        total = torch.exp2(tri.scale.float() - 127)
    codes = reference.e2m1_encode(reference._safe_div(xb, total.unsqueeze(-1)))
    assert torch.equal(tri.qdata, reference.pack_4bit(codes.reshape(xb.shape[0], -1)))
    n, worst = check_hessian_choice(x, tri, ref, h)
    print(f"{scheme} {shape}: {n} of {tri.scale.numel()} scales differ, largest excess error {worst:.2e} x^T H x")


def test_search_ops_are_registered() -> None:
    assert ops.resolve("search_nvfp4", "auto", torch.device("cuda")) is torch.ops.quanta.search_nvfp4
    assert ops.resolve("search_mxfp4", "auto", torch.device("cuda")) is torch.ops.quanta.search_mxfp4
