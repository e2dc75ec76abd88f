"""GPU-only checks of the quantized Linear kernels (skipped without CUDA)."""

import pytest
import torch
from _matmul_cases import FUSED, FUSED_IDS, assert_within_bound

from quantize_cli import QuantLinear, dequantize, quantize
from quantize_cli.nn.functional import dequantize_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_int8_static_runs_int_mm_on_cuda(batch: int) -> None:
    linear = torch.nn.Linear(512, 256, bias=True)
    x = torch.randn(batch, 512)
    module = QuantLinear.from_linear(linear, "int8-static", input_scale=x.abs().amax() / 127)
    want = dequantize_linear(x.double(), module.quant_state(), linear.bias.detach().double(), module.input_scale)
    cuda = module.to("cuda")
    got = cuda(x.cuda()).cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


# ---- the fused dequant-GEMV (quantize_cli.nn.fused) ---------------------------------------------------------

LARGE = [(4096, 11008), (11008, 4096)]  # (out_features, in_features) of a 7B MLP


def _fused_modules():
    pytest.importorskip("triton")
    from quantize_cli.kernels.triton import matmul  # noqa: PLC0415
    from quantize_cli.nn import fused  # noqa: PLC0415

    return matmul, fused


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch of every fused kernel launch (nn.fused calls matmul.quant_matmul)."""
    matmul, _ = _fused_modules()
    calls: list[int] = []
    real = matmul.quant_matmul

    def spy(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(matmul, "quant_matmul", spy)
    return calls


@pytest.mark.parametrize("shape", LARGE, ids=["4096x11008", "11008x4096"])
@pytest.mark.parametrize(("scheme", "opts"), FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_large_shapes(shape: tuple[int, int], scheme: str, opts: dict, m: int) -> None:
    """Every fused scheme on the benchmark's shapes, both tilings (one row: fp32 FMAs; 16: tensor cores)."""
    matmul, fused = _fused_modules()
    w = torch.randn(shape, device="cuda")
    state = quantize(w, scheme, **opts)
    x = torch.randn(m, shape[1], device="cuda", dtype=torch.float16)
    bias = torch.randn(shape[0], device="cuda", dtype=torch.float16)
    y = fused.gemv_linear(x, state, bias)
    assert_within_bound(y, x, dequantize(state), bias, rounded_weight=m > 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 7])
def test_gemv_other_dtypes(dtype: torch.dtype, m: int) -> None:
    _, fused = _fused_modules()
    state = quantize(torch.randn(4096, 11008, device="cuda"), "nf4")
    x = torch.randn(m, 11008, device="cuda", dtype=dtype)
    assert_within_bound(fused.gemv_linear(x, state), x, dequantize(state), None, rounded_weight=m > 1)


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int4", "int8", "nf8", "fp8", "nvfp4", "mxfp4"])
def test_quant_linear_dispatch_on_cuda(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantLinear on CUDA: per row count, whichever of the fused kernel and dequantize + cuBLAS the first
    call timed faster (``fused_choices``); schemes without a fused kernel always dequantize."""
    _, fused = _fused_modules()
    calls = _count_kernel_calls(monkeypatch)
    linear = torch.nn.Linear(1024, 768, bias=True, device="cuda", dtype=torch.float16)
    module = QuantLinear.from_linear(linear, scheme)
    w = module.dequantize_weight()
    xs = [torch.randn(rows, 1024, device="cuda", dtype=torch.float16) for rows in (1, 16, 64)]
    for x in xs:
        module(x)  # the first call of each row count times both paths (many kernel calls)
    calls.clear()
    for x in xs:
        assert_within_bound(module(x), x, w, module.bias, rounded_weight=True)
    chosen = {key[4]: won for key, won in fused.fused_choices().items() if key[:2] == (scheme, (768, 1024))}
    if scheme in fused.FUSED_SCHEMES:
        assert set(chosen) == {1, 16, 64}
        assert calls == [r for r in (1, 16, 64) if chosen[r]]  # later calls follow the recorded choice
    else:
        assert calls == [] and chosen == {}


@pytest.mark.parametrize(("scheme", "opts"), [FUSED[0], FUSED[3]], ids=["nf4", "int8"])
@pytest.mark.parametrize("m", [300, 4096])
def test_fused_gemm_many_rows(scheme: str, opts: dict, m: int) -> None:
    """The fused kernel's GEMM tilings (64 or 128 rows per program) on a large batch, each candidate."""
    matmul, fused = _fused_modules()
    state = quantize(torch.randn(4096, 11008, device="cuda"), scheme, **opts)
    x = torch.randn(m, 11008, device="cuda", dtype=torch.float16)
    for cfg in matmul.candidates(m, 4096, 11008, 4 if scheme == "nf4" else 8, 64):
        assert cfg.dot and cfg.rows_per_program(m) in (64, 128)
        assert_within_bound(fused.gemv_linear(x, state, None, cfg), x, dequantize(state), None, rounded_weight=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_fp8_activations_run_scaled_mm(dtype: torch.dtype, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """W8A8 fp8 on a Hopper GPU: torch._scaled_mm (1x128 blockwise recipe; rows padded to 16) equals the
    fp32 emulation of the same fp8 operands (both accumulate in fp32)."""
    from quantize_cli.nn import functional  # noqa: PLC0415

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the blockwise recipe is Hopper's")
    state = quantize(torch.randn(4096, 1000, device="cuda"), "fp8")  # K padded to 1024
    x = torch.randn(rows, 1000, device="cuda", dtype=dtype)
    used: list[int] = []
    real = functional._scaled_mm_blockwise
    monkeypatch.setattr(functional, "_scaled_mm_blockwise", lambda *a: (used.append(1), real(*a))[1])
    with functional.fp8_activations():
        y = functional.quant_linear(x, state)
    assert used == [1] and not functional._SCALED_MM_FAILED
    xq, sx = functional.quantize_fp8_groups(torch.nn.functional.pad(x, (0, 24)), 128)
    want = functional.fp8_emulated_matmul(xq, sx, state)
    err = ((y.float() - want).abs().max() / want.abs().max()).item()
    assert err < 4e-3, err  # the output's own rounding (bf16: 2**-9) plus the GEMM's fp32 accumulation


def test_load_quantized_on_cuda_runs_the_gemv(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted (tiny, random) Llama reloaded on CUDA runs its Linears through the GEMV (forced: the
    timed choice could go either way on these small layers), and its logits equal those of the same
    model forced onto dequantize + cuBLAS."""
    transformers = pytest.importorskip("transformers")
    from quantize_cli import convert, load_quantized  # noqa: PLC0415

    _, fused = _fused_modules()
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    convert(str(tmp_path / "src"), scheme="int4", out=tmp_path / "int4", device="cuda", progress=False)
    model = load_quantized(tmp_path / "int4", device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 512, (1, 5), device="cuda")
    calls = _count_kernel_calls(monkeypatch)
    monkeypatch.setattr(fused, "fused_wins", lambda *args: True)
    with torch.inference_mode():
        fused_logits = model(ids).logits.float()
        assert len(calls) == 2 * 7 and set(calls) == {5}  # 7 Linears per layer, 5 rows each
        monkeypatch.setattr(fused, "fused_wins", lambda *args: False)
        plain_logits = model(ids).logits.float()
    assert len(calls) == 14
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-2, atol=1e-2)
