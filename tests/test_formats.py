"""Hand-written tables of format edge cases: every expected value below was worked out by hand."""

import pytest
import torch

from quantize_cli import SCHEMES, dequantize, quantize
from quantize_cli.kernels import reference

# ---- E2M1 rounding: nearest value, ties to the even mantissa, saturation at 6 --------------------------

E2M1_TABLE = [
    (0.0, 0.0), (0.1, 0.0), (0.25, 0.0), (0.26, 0.5), (0.5, 0.5), (0.74, 0.5), (0.75, 1.0),
    (1.0, 1.0), (1.25, 1.0), (1.26, 1.5), (1.5, 1.5), (1.74, 1.5), (1.75, 2.0), (2.0, 2.0),
    (2.5, 2.0), (2.51, 3.0), (3.0, 3.0), (3.49, 3.0), (3.5, 4.0), (4.0, 4.0), (5.0, 4.0),
    (5.01, 6.0), (6.0, 6.0), (7.0, 6.0), (1e6, 6.0),
]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), E2M1_TABLE)
def test_e2m1_round_half_even_and_saturate(value: float, expected: float) -> None:
    v = torch.tensor([value, -value])
    out = reference.e2m1_decode(reference.e2m1_encode(v))
    assert out.tolist() == [expected, -expected]


def test_e2m1_codes() -> None:
    v = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, -0.1])
    assert reference.e2m1_encode(v).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15, 0]  # -0.1 -> +0 code


# ---- NVFP4 ----------------------------------------------------------------------------------------------


def _nvfp4_roundtrip(block: list[float], global_scale: float = 1.0) -> tuple[list[float], float]:
    x = torch.tensor(block, dtype=torch.float32).reshape(1, -1)
    state = quantize(x, "nvfp4", global_scale=torch.tensor(global_scale))
    return dequantize(state).reshape(-1).tolist(), state.scale.float().reshape(-1)[0].item()


def test_nvfp4_elements_with_unit_block_scale() -> None:
    # amax 6 and global scale 1 give block scale exactly 1, so elements round like bare E2M1.
    block = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -3.5, 0.3, -5.5, 0.0, 4.4]
    out, scale = _nvfp4_roundtrip(block)
    assert scale == 1.0
    assert out == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -1.0, -2.0, -4.0, 0.5, -6.0, 0.0, 4.0]


@pytest.mark.parametrize(
    ("amax", "expected_scale"),
    [
        (6 * 2.0**-8, 2.0**-8),  # E4M3 subnormal 2 * 2^-9, exact
        (6 * 3 * 2.0**-9, 3 * 2.0**-9),  # subnormal 3 * 2^-9, exact
        (6 * 1.4 * 2.0**-9, 2.0**-9),  # 1.4 * 2^-9 rounds to the smallest subnormal
        (6 * 2.0**-11, 0.0),  # below half the smallest subnormal: the scale flushes to 0
        (6 * 2.0**-6, 2.0**-6),  # smallest normal
        (5000.0, 448.0),  # saturates at the E4M3 maximum
        (1000.0, 160.0),  # 166.7 rounds to 160 (E4M3 step is 16 in [128, 256))
    ],
)
def test_nvfp4_e4m3_block_scales(amax: float, expected_scale: float) -> None:
    out, scale = _nvfp4_roundtrip([amax] + [0.0] * 15)
    assert scale == expected_scale
    # The largest element decodes to 6 * scale when it saturates, or to the nearest E2M1 multiple.
    if expected_scale == 0.0:
        assert out[0] == 0.0
    else:
        ratio = amax / expected_scale
        nearest = float(reference.e2m1_decode(reference.e2m1_encode(torch.tensor([ratio])))[0])
        assert out[0] == nearest * expected_scale


def test_nvfp4_default_global_scale_maps_amax_to_448_times_6() -> None:
    x = torch.zeros(2, 32)
    x[1, 20] = -2688.0  # amax / (448 * 6) = 1 exactly
    x[0, 3] = 1.0
    state = quantize(x, "nvfp4")
    assert state.global_scale.item() == 1.0
    assert state.scale[1, 1].float().item() == 448.0
    out = dequantize(state)
    assert out[1, 20].item() == -2688.0
    # block scale 1/6 = 0.1667 -> E4M3 0.171875 (step 2^-6 in [0.125, 0.25)); 1 / 0.171875 = 5.82 -> 6
    assert state.scale[0, 0].float().item() == 0.171875
    assert out[0, 3].item() == 6 * 0.171875


# ---- MXFP4: E8M0 scales, OCP rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amax", "biased_exponent", "decoded_amax"),
    [
        (1.0, 125, 1.0),  # floor(log2 1) - 2 = -2 -> 2^-2; 1 / 0.25 = 4 -> E2M1 4
        (6.0, 127, 6.0),  # floor(log2 6) = 2 -> 2^0
        (7.9, 127, 6.0),  # OCP rule clips: 7.9 / 1 saturates at 6
        (8.0, 128, 8.0),  # 2^1; 8 / 2 = 4
        (0.3, 123, 0.25),  # floor(log2 .3) = -2 -> 2^-4; 0.3 * 16 = 4.8 -> 4 (4.8 < 5); 4 / 16
        (2.0**-130, 0, 0.0),  # fp32 subnormal: exponent clamps at -127, elements round to 0
    ],
)
def test_mxfp4_e8m0_scales(amax: float, biased_exponent: int, decoded_amax: float) -> None:
    x = torch.zeros(1, 32)
    x[0, 5] = amax
    state = quantize(x, "mxfp4")
    assert state.scale.dtype == torch.uint8
    assert state.scale.item() == biased_exponent
    assert dequantize(state)[0, 5].item() == pytest.approx(decoded_amax, rel=0, abs=0)


# ---- integer and fp8 rounding -------------------------------------------------------------------------


def test_int8_round_half_even() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.49]])
    state = quantize(x, "int8", block_size=8)
    assert state.scale.item() == 1.0
    assert state.qdata.tolist() == [[127, 0, 2, 2, 0, -2, -126, 3]]


def test_int4_symmetric_and_asymmetric() -> None:
    x = torch.tensor([[7.0, -7.0, 3.5, 2.5, 0.0, -0.4, 1.0, 6.6]])
    sym = quantize(x, "int4", block_size=8)
    assert dequantize(sym).tolist() == [[7.0, -7.0, 4.0, 2.0, 0.0, 0.0, 1.0, 7.0]]
    asym_x = torch.tensor([[-1.0, 2.0, 0.0, 0.2, 1.0, -0.6, 1.9, 0.5]])
    asym = quantize(asym_x, "int4", block_size=8, symmetric=False)
    # range [-1, 2] -> s = 0.2, zero point round(5) = 5; codes round(x / 0.2) + 5
    assert asym.zero_point.tolist() == [[5]]
    expected = torch.tensor([[0, 15, 5, 6, 10, 2, 15, 7]], dtype=torch.float32)  # 0.5/0.2 = 2.5 -> 2
    assert torch.equal(dequantize(asym), (expected - 5) * asym.scale.item())


def test_fp8_ties_and_saturation() -> None:
    # absmax 448 -> scale 1; 17 lies between 16 and 18 (step 2) and goes to 16 (even mantissa);
    # 19 between 18 and 20 goes to 20; 0.0009 is below half the smallest subnormal 2^-9 and flushes;
    # 0.001 is above it and becomes 2^-9; 1.5 * 2^-9 is a tie and goes to the even 2 * 2^-9.
    x = torch.tensor([[448.0, 17.0, 19.0, -17.0, 0.0009, 0.001, 0.0029296875, 300.0]])
    state = quantize(x, "fp8", block_size=8)
    assert state.scale.item() == 1.0
    assert dequantize(state).tolist() == [[448.0, 16.0, 20.0, -16.0, 0.0, 2.0**-9, 2.0**-8, 288.0]]


# ---- zeros, shapes and blocks the last dimension does not fill -----------------------------------------

QUANTIZED = [name for name in SCHEMES]


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_all_zero_blocks_roundtrip_to_zero(scheme: str) -> None:
    x = torch.zeros(4, 256)
    x[0, :128] = torch.randn(128)
    out = dequantize(quantize(x, scheme))
    assert not out.isnan().any()
    assert torch.all(out[1:] == 0) and torch.all(out[0, 128:] == 0)
    assert out[0, :128].abs().sum() > 0


@pytest.mark.parametrize("scheme", QUANTIZED)
@pytest.mark.parametrize("shape", [(100,), (7, 100), (2, 3, 100), (5, 64), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_padding(scheme: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.randn(shape).to(dtype)
    state = quantize(x, scheme)
    out = dequantize(state)
    assert out.shape == x.shape and out.dtype == dtype
    # Padding must not change the values: quantizing the explicitly zero-padded 2-D tensor gives the
    # same codes and scales for the real columns.
    block = state.block_size
    if block is not None:
        cols = shape[-1]
        padded_cols = -(-cols // block) * block
        padded = torch.zeros(x.numel() // cols, padded_cols, dtype=dtype)
        padded[:, :cols] = x.reshape(-1, cols)
        ref = dequantize(quantize(padded, scheme))[:, :cols]
        assert torch.equal(out.reshape(-1, cols), ref)
        assert state.qdata.shape[0] == x.numel() // cols


def test_int8_error_is_bounded_by_half_a_step_per_block() -> None:
    x = torch.randn(16, 100) * torch.logspace(-3, 3, 16).unsqueeze(1)
    state = quantize(x, "int8", block_size=32)
    err = (dequantize(state) - x).abs()
    scale = state.scale.repeat_interleave(32, dim=1)[:, :100]
    assert torch.all(err <= scale / 2 * (1 + 1e-6))
