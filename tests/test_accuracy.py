"""Round-trip error and storage on a standard normal 2048 x 4096 fp32 tensor."""

import pytest
import torch

from quantize_cli import dequantize, quantize


@pytest.fixture(scope="module")
def normal() -> torch.Tensor:
    return torch.randn(2048, 4096, generator=torch.Generator().manual_seed(1234))


# (scheme, block, options, MAE bound); bitsandbytes measures nf4 0.0728 and fp4 0.0965.
MAE_BOUNDS = [
    ("nf4", 64, {}, 0.0735),
    ("fp4", 64, {}, 0.0975),
    ("int8", 64, {}, 0.0055),
    ("nf8", 64, {}, 0.0055),
    ("fp8", 128, {}, 0.019),
    ("nvfp4", 16, {}, 0.075),
    ("mxfp4", 32, {}, 0.09),
    ("int4", 128, {}, 0.105),
]


@pytest.mark.parametrize(("scheme", "block", "options", "bound"), MAE_BOUNDS)
def test_mean_absolute_error(normal: torch.Tensor, scheme: str, block: int, options: dict, bound: float) -> None:
    state = quantize(normal, scheme, block_size=block, **options)
    mae = (dequantize(state) - normal).abs().mean().item()
    assert mae <= bound
    # Not trivially small either: an identity "quantizer" would also pass the bound.
    assert mae > bound / 4


BYTES_PER_ELEMENT = [
    ("int8", 64, {}, 1.0625),
    ("nf4", 64, {}, 0.5625),
    ("fp4", 64, {}, 0.5625),
    ("nf8", 64, {}, 1.0625),
    ("fp8", 128, {}, 1.03125),
    ("mxfp4", 32, {}, 0.53125),
    ("int4", 128, {}, 0.53125),
    ("int4", 128, {"symmetric": False}, 0.53125 + 1 / 128),
    ("fp16", None, {}, 2.0),
    ("bf16", None, {}, 2.0),
]


@pytest.mark.parametrize(("scheme", "block", "options", "expected"), BYTES_PER_ELEMENT)
def test_bytes_per_element(normal: torch.Tensor, scheme: str, block: int, options: dict, expected: float) -> None:
    state = quantize(normal, scheme, block_size=block, **options)
    assert state.nbytes / normal.numel() == expected


def test_nvfp4_bytes_per_element_plus_tensor_scale(normal: torch.Tensor) -> None:
    state = quantize(normal, "nvfp4")
    assert state.nbytes == normal.numel() * 0.5625 + 4
