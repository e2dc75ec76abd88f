"""nf4/fp4 codes, absmax and dequantized values equal bitsandbytes' own, bit for bit."""

import pytest
import torch

from quantize_cli import dequantize, quantize

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (3, 5, 128), (4096,)])
def test_quantize_4bit_bit_identical(quant_type: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (torch.randn(shape) * 3).to(dtype)
    flat = x.reshape(-1)
    flat[:64] = 0  # an all-zero block
    flat[70] = flat[64:128].abs().max() * -1.0001  # a negative absmax
    bnb_q, bnb_state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    state = quantize(x, quant_type, block_size=64, backend="reference")
    assert torch.equal(state.qdata.reshape(-1), bnb_q.reshape(-1))
    assert torch.equal(state.scale.reshape(-1), bnb_state.absmax)
    ours = dequantize(state)
    theirs = bnb_functional.dequantize_4bit(bnb_q, bnb_state)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs.reshape(shape))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebook_midpoint_ties_match_bitsandbytes(quant_type: str) -> None:
    """Values exactly on a midpoint between two codebook entries round as bitsandbytes rounds them."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu")
    s = code.sort().values
    mids = (s[:-1] + s[1:]) / 2
    block = torch.cat([mids, torch.tensor([1.0]), -mids, mids.flip(0), torch.zeros(64 - 46)])
    x = block.reshape(1, 64)
    bnb_q, _ = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert torch.equal(quantize(x, quant_type, block_size=64).qdata.reshape(-1), bnb_q.reshape(-1))
