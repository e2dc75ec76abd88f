"""GPU-only checks of the quantized Linear kernels (skipped without CUDA)."""

import pytest
import torch

from quantize_cli import QuantLinear
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
