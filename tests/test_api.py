import pytest
import torch

from quantize_cli import SCHEMES, QuantState, dequantize, quantize
from quantize_cli.schemes import UnknownSchemeError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_rejected(bad: float) -> None:
    x = torch.randn(4, 64)
    x[2, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, "nf4")


def test_unknown_scheme_lists_valid_ones() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        quantize(torch.randn(64), "nf5")
    message = str(info.value)
    assert "nf5" in message
    for name in SCHEMES:
        assert name in message
    assert "int8_linear" in message


@pytest.mark.parametrize(("scheme", "block", "match"), [
    ("nf4", 0, "positive"), ("int8", -64, "positive"), ("nf4", 63, "even"), ("nvfp4", 15, "even"),
    ("int4", 1.5, "positive"),
])  # fmt: skip
def test_bad_block_sizes(scheme: str, block: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(4, 64), scheme, block_size=block)


def test_odd_block_is_fine_for_8bit() -> None:
    x = torch.randn(3, 21)
    out = dequantize(quantize(x, "int8", block_size=7))
    assert (out - x).abs().max() < x.abs().max() / 127


def test_non_float_and_unknown_options_rejected() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.arange(64), "nf4")
    with pytest.raises(ValueError, match="symmetric"):
        quantize(torch.randn(64), "nf4", symmetric=False)
    with pytest.raises(ValueError, match="backend"):
        quantize(torch.randn(64), "nf4", backend="cuda-magic")


def test_aliases_resolve() -> None:
    x = torch.randn(8, 128)
    assert quantize(x, "int8_linear").scheme == "int8"
    assert quantize(x, "int4_linear").scheme == "int4"


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_to_dict_from_dict_roundtrip(scheme: str) -> None:
    x = torch.randn(6, 100, dtype=torch.bfloat16)
    state = quantize(x, scheme)
    tensors, meta = state.to_dict()
    import json

    meta = json.loads(json.dumps(meta))  # JSON-able
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = QuantState.from_dict(tensors, meta)
    assert torch.equal(dequantize(back), dequantize(state))
    assert back.shape == state.shape and back.dtype == state.dtype and back.block_size == state.block_size


def test_quantstate_public_fields() -> None:
    import dataclasses

    names = [f.name for f in dataclasses.fields(QuantState)]
    assert names == [
        "qdata", "scale", "global_scale", "zero_point", "codebook", "shape", "dtype", "scheme", "block_size",
    ]  # fmt: skip
    state = quantize(torch.randn(4, 128), "nf4")
    assert state.codebook is not None and state.codebook.numel() == 16
    assert state.global_scale is None and state.zero_point is None
    assert state.qdata.dtype == torch.uint8 and state.qdata.shape == (4, 64)


def test_one_scale_per_row_when_block_is_the_row() -> None:
    x = torch.randn(5, 300)
    state = quantize(x, "int8", block_size=300)
    assert state.scale.shape == (5, 1)
    assert torch.allclose(state.scale[:, 0], x.abs().amax(dim=1) / 127)
