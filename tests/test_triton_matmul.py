"""The fused dequant-GEMV (``kernels.triton.matmul`` through ``nn.fused``) against the fp32 reference
``x.float() @ dequantize(quantize(W)).float().T + b``, and the CUDA registration of the quantized Linear.

Runs on CUDA when there is one, else on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``,
exported before Python starts, as CI does); skipped when neither is available. Shapes stay tiny.

Tolerance: ``_matmul_cases.assert_within_bound`` (derived from the arithmetic, not guessed).
"""

from __future__ import annotations

import os

import pytest
import torch
from _matmul_cases import FUSED, FUSED_IDS, assert_within_bound

from quantize_cli import dequantize, quantize
from quantize_cli.nn import functional

pytest.importorskip("triton")

from quantize_cli.kernels.triton import matmul  # noqa: E402
from quantize_cli.nn import fused  # noqa: E402

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not (_INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before Python starts)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 13, 199  # odd N, odd K: padded codes, and a last (even, odd) input pair cut at K
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(rows: int = N, cols: int = K) -> torch.Tensor:
    """fp32 weights with a wide range per row and one all-zero block, so scales differ block to block."""
    w = torch.randn(rows, cols) * torch.logspace(-1, 1, cols)
    w[0, :64] = 0.0
    return w.to(DEVICE)


@pytest.mark.parametrize(("scheme", "opts"), FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gemv_matches_fp32_reference(scheme: str, opts: dict, dtype: torch.dtype, m: int, bias: bool) -> None:
    """The default tiling of each batch (fp32 FMAs; on a GPU, the fastest candidate)."""
    state = quantize(_weight(), scheme, **opts)
    b = torch.randn(N, device=DEVICE) if bias else None
    x = torch.randn(m, K, device=DEVICE).to(dtype)
    y = fused.gemv_linear(x, state, b)
    # Several rows may take the tensor-core path on a GPU (the tiling is timed there): rounded weights.
    assert_within_bound(y, x, dequantize(state), b, rounded_weight=m > 1)


@pytest.mark.parametrize(("scheme", "opts"), [FUSED[0], FUSED[3], FUSED[5]], ids=["nf4", "int8", "int4-asym"])
@pytest.mark.parametrize(
    "config",
    [
        matmul.GemvConfig(16, 2, split_k=1, dot=True),  # one row through the tensor-core path
        matmul.GemvConfig(8, 1, split_k=3, dot=False),  # the FMA path, all rows in one program; split-K
        matmul.GemvConfig(32, 1, split_k=2, dot=True),  # split-K atomics, bias added after
    ],
    ids=["dot", "fma-split3", "dot-split2"],
)
@pytest.mark.parametrize("m", [1, 12])  # 2 or 24 rows: the FMA path's 16-row programs, one or two of them
def test_explicit_tilings(scheme: str, opts: dict, config: matmul.GemvConfig, m: int) -> None:
    state = quantize(_weight(), scheme, block_size=32, **opts)  # 7 steps of one 32-column sub-tile
    b = torch.randn(N, device=DEVICE)
    x = torch.randn(2, m, K, device=DEVICE).to(torch.float16)
    y = fused.gemv_linear(x, state, b, config)
    assert y.shape == (2, m, N)
    assert_within_bound(y.reshape(-1, N), x.reshape(-1, K), dequantize(state), b, rounded_weight=config.dot)


@pytest.mark.parametrize(("scheme", "opts"), [FUSED[0], FUSED[5]], ids=["nf4", "int4-asym"])
def test_gemm_tiling_many_rows(scheme: str, opts: dict) -> None:
    """The fused GEMM tiling of large batches (64 input rows per program on the tensor cores): 70 rows
    are two programs along M, the second cut at 70."""
    state = quantize(_weight(), scheme, block_size=32, **opts)
    config = matmul.GemvConfig(16, 1, dot=True, block_m=64)
    assert config.rows_per_program(70) == 64 and matmul.candidates(70, N, 224, 4, 32)[0].rows_per_program(70) >= 64
    b = torch.randn(N, device=DEVICE)
    x = torch.randn(70, K, device=DEVICE, dtype=torch.float16)
    assert_within_bound(fused.gemv_linear(x, state, b, config), x, dequantize(state), b, rounded_weight=True)


@pytest.mark.parametrize(("scheme", "block"), [("nf4", 48), ("int8", 80), ("nf8", 16), ("int4", 256)])
def test_block_sizes(scheme: str, block: int) -> None:
    """Blocks that are not powers of two (sub-tiles of their power-of-two factor) and one wider than K."""
    state = quantize(_weight(), scheme, block_size=block)
    x = torch.randn(1, K, device=DEVICE, dtype=torch.float16)
    assert_within_bound(fused.gemv_linear(x, state), x, dequantize(state), None, rounded_weight=False)


def test_unsupported_block_falls_back_to_dequantize() -> None:
    """block 40 = 8 * 5: sub-tiles of 8 columns are too narrow; fused_linear takes dequantize + F.linear."""
    state = quantize(_weight(), "nf4", block_size=40)
    x = torch.randn(2, K, device=DEVICE, dtype=torch.float16)
    assert not matmul.supports(40) and not fused.fusable(x, state)
    torch.testing.assert_close(fused.fused_linear(x, state), functional.dequantize_linear(x, state), rtol=0, atol=0)


@pytest.mark.parametrize(("scheme", "limit"), [("int4", "FUSED_MAX_ROWS"), ("nf4", "FUSED_MAX_ROWS")])
def test_batch_rule(scheme: str, limit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where nothing is timed (the interpreter; on a GPU forced here): up to the scheme's row limit (all
    leading dims together) the GEMV, more rows dequantize + F.linear."""
    monkeypatch.setattr(matmul, "can_time", lambda x: False)
    state = quantize(_weight(), scheme)
    rows = getattr(fused, limit)
    assert fused.max_rows(state) == rows
    calls: list[int] = []
    real = fused.gemv_linear

    def spy(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.numel() // K)
        return real(x, *args)

    monkeypatch.setattr(fused, "gemv_linear", spy)
    for shape in [(rows, K), (2, rows // 2, K), (rows + 1, K)]:
        x = torch.randn(*shape, device=DEVICE, dtype=torch.float16)
        y = fused.fused_linear(x, state)
        assert_within_bound(y.reshape(-1, N), x.reshape(-1, K), dequantize(state), None, rounded_weight=True)
    assert calls == [rows, rows]


def test_input_scale_rounds_the_input_first() -> None:
    """A static int8 input scale on a weight-only scheme: x is fake-quantized before the kernel."""
    state = quantize(_weight(), "int8")
    x = torch.randn(1, K, device=DEVICE)
    s = torch.tensor(0.02)
    y = fused.fused_linear(x, state, None, s)
    assert_within_bound(y, functional.fake_quantize_input(x, s), dequantize(state), None, rounded_weight=False)


def test_registered_for_cuda() -> None:
    """Importing nn.fused registers the GEMV for the fused schemes on CUDA and names dequantize + F.linear
    for NVFP4/MXFP4; the CPU keeps the default path."""
    functional.load_device_kernels("cuda")
    for scheme in fused.FUSED_SCHEMES:
        assert functional._OVERRIDES[("cuda", scheme)] is fused.fused_linear
        assert ("cpu", scheme) not in functional._OVERRIDES
    for scheme in fused.DEQUANTIZE_SCHEMES:
        assert functional._OVERRIDES[("cuda", scheme)] is functional.dequantize_linear
    assert functional._OVERRIDES[("cuda", "int8-static")] is functional.int8_static_linear


def test_rejects_bad_inputs() -> None:
    state = quantize(_weight(), "nf4")
    codes, scale = state.qdata, state.scale
    with pytest.raises(ValueError, match="2-D"):
        matmul.quant_matmul(torch.randn(K, device=DEVICE, dtype=torch.float64), codes, scale, 64, 4)
    with pytest.raises(ValueError, match="do not fit"):
        matmul.quant_matmul(torch.randn(1, 300, device=DEVICE), codes, scale, 64, 4)
    with pytest.raises(ValueError, match="unsupported"):
        matmul.quant_matmul(torch.randn(1, K, device=DEVICE), codes, scale, 40, 4)
