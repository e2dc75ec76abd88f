"""QuantLinear, Linear4bit, Linear8bitLt on the CPU: output against ``x @ dequantize(quantize(W)).T + b``
computed in float64, state_dict round trips into fresh modules, ``.to()`` that never touches the codes."""

import pytest
import torch
from torch import nn

from quantize_cli import SCHEMES, Linear4bit, Linear8bitLt, QuantLinear, dequantize, quantize
from quantize_cli.nn import functional
from quantize_cli.nn import modules as nn_modules

IN, OUT = 200, 48  # 200 is a multiple of none of the 4-bit/8-bit default blocks but 8: padding is exercised


def _linear(bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    return nn.Linear(IN, OUT, bias=bias, dtype=dtype)


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **quant: object) -> torch.Tensor:
    """``x @ dequantize(quantize(W)).T + b`` in float64: the dequantized weight, exactly multiplied."""
    w = dequantize(quantize(weight.detach(), **quant)).double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.detach().double()


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in module.named_buffers()}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("bias", [True, False])
def test_output_equals_dequantized_matmul(scheme: str, bias: bool) -> None:
    linear = _linear(bias)
    module = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(2, 5, IN)
    y = module(x)
    assert y.shape == (2, 5, OUT) and y.dtype == torch.float32
    ref = _reference(x, linear.weight, linear.bias, scheme=scheme)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 accumulation error only


@pytest.mark.parametrize("scheme", ["nf4", "int8", "nvfp4", "fp8"])
def test_bfloat16_input_computes_in_bfloat16(scheme: str) -> None:
    linear = _linear(dtype=torch.bfloat16)
    module = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    # Same numbers as transformers' own nn.Linear holding the dequantized weight.
    w = dequantize(quantize(linear.weight.detach(), scheme))
    torch.testing.assert_close(y, nn.functional.linear(x, w, linear.bias), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("scheme", "block", "options"),
    [("int4", 32, {"symmetric": False}), ("int4", 64, {}), ("int8", IN, {}), ("nf4", 40, {}), ("nf8", 7, {})],
)
def test_options_and_block_sizes(scheme: str, block: int, options: dict) -> None:
    linear = _linear()
    module = QuantLinear.from_linear(linear, scheme, block, **options)
    assert module.block_size == block
    assert (module.weight_zero_point is not None) == (options.get("symmetric") is False)
    x = torch.randn(3, IN)
    ref = _reference(x, linear.weight, linear.bias, scheme=scheme, block_size=block, **options)
    torch.testing.assert_close(module(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_nvfp4_global_scale_option_is_used() -> None:
    linear = _linear()
    scale = torch.tensor(0.01)
    module = QuantLinear.from_linear(linear, "nvfp4", global_scale=scale)
    assert torch.equal(module.weight_global_scale, scale)
    x = torch.randn(3, IN)
    ref = _reference(x, linear.weight, linear.bias, scheme="nvfp4", global_scale=scale)
    torch.testing.assert_close(module(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_state_dict_round_trip_into_fresh_module(scheme: str) -> None:
    source = QuantLinear.from_linear(_linear(), scheme)
    state = source.state_dict()
    assert set(state) >= {"weight", "bias"}
    fresh = QuantLinear(IN, OUT, scheme=scheme)
    fresh.load_state_dict(state)
    for name, t in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t) and fresh.state_dict()[name].dtype == t.dtype, name
    x = torch.randn(3, IN)
    assert torch.equal(fresh(x), source(x))


@pytest.mark.parametrize(("scheme", "block", "options"), [("int4", 32, {"symmetric": False}), ("int8", IN, {})])
def test_load_infers_block_size_and_zero_point(scheme: str, block: int, options: dict) -> None:
    source = QuantLinear.from_linear(_linear(), scheme, block, **options)
    fresh = QuantLinear(IN, OUT, scheme=scheme)  # default block, symmetric
    fresh.load_state_dict(source.state_dict())
    assert fresh.block_size == block
    assert set(fresh.state_dict()) == set(source.state_dict())
    x = torch.randn(3, IN)
    assert torch.equal(fresh(x), source(x))


def test_assign_into_meta_module_takes_the_tensors() -> None:
    source = QuantLinear.from_linear(_linear(), "nf4")
    state = source.state_dict()
    empty = QuantLinear(IN, OUT, scheme="nf4", device="meta")
    empty.load_state_dict(state, assign=True)
    assert empty.weight.data_ptr() == state["weight"].data_ptr()  # no copy
    x = torch.randn(3, IN)
    assert torch.equal(empty(x), source(x))


def test_mismatched_state_dict_is_refused() -> None:
    state = QuantLinear.from_linear(_linear(), "nf4").state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        QuantLinear(IN + 64, OUT, scheme="nf4").load_state_dict(state)
    del state["weight_scale"]
    with pytest.raises(RuntimeError, match="weight_scale"):
        QuantLinear(IN, OUT, scheme="nf4").load_state_dict(state)


@pytest.mark.parametrize("scheme", ["nf4", "fp8", "nvfp4", "int4", "bf16"])
def test_dtype_cast_keeps_codes_and_sets_compute_dtype(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    linear = _linear()
    module = QuantLinear.from_linear(linear, scheme)
    before = _buffers(module)

    def no_quantize(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantize called by .to()")

    monkeypatch.setattr(nn_modules, "quantize", no_quantize)
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(module)
        for name, t in module.named_buffers():
            assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
    assert module.compute_dtype == torch.bfloat16 and module.bias.dtype == torch.bfloat16
    module.float()
    assert module.compute_dtype == torch.float32
    module.to(torch.float16)
    x = torch.randn(3, IN)
    y = module(x)
    assert y.dtype == torch.float32  # output in the input's dtype, as bitsandbytes does
    w = dequantize(quantize(linear.weight.detach(), scheme), dtype=torch.float16)
    expected = nn.functional.linear(x.half(), w, module.bias).float()  # the bias went through bf16 above
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_device_move_carries_packed_buffers() -> None:
    module = QuantLinear.from_linear(_linear(), "int4", 32, symmetric=False)
    shapes = {name: (t.shape, t.dtype) for name, t in module.named_buffers()}
    module.to("meta")
    assert {name: (t.shape, t.dtype) for name, t in module.named_buffers()} == shapes
    assert all(t.is_meta for t in [*module.buffers(), *module.parameters()])
    module.to_empty(device="cpu")
    assert {name: (t.shape, t.dtype, t.device.type) for name, t in module.named_buffers()} == {
        name: (*shape_dtype, "cpu") for name, shape_dtype in shapes.items()
    }


def test_seed_linear4bit_usage() -> None:
    layer = Linear4bit(1024, 4096, quant_type="nf4")
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(8, 1024)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, bias))  # a float Linear until quantized
    layer.quantize_weight(block_size=64)
    y = layer(x)
    assert y.shape == (8, 4096)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (4096, 512)
    assert layer.weight_scale.shape == (4096, 16)
    ref = _reference(x, weight, bias, scheme="nf4", block_size=64)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize_weight()


def test_linear4bit_codes_match_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(256, 64)
    # compress_statistics=False: plain fp32 absmax (bitsandbytes' default double-quantizes it).
    theirs = bnb.nn.Linear4bit(256, 64, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on .to(device)
    ours = Linear4bit(256, 64, quant_type="nf4")
    ours.load_state_dict(linear.state_dict())
    ours.quantize_weight(block_size=theirs.weight.quant_state.blocksize)
    assert torch.equal(ours.weight.flatten(), theirs.weight.data.flatten())
    assert torch.equal(ours.weight_scale.flatten(), theirs.weight.quant_state.absmax.flatten())
    x = torch.randn(3, 256)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_linear4bit_quantized_state_dict_into_fresh_float_module() -> None:
    layer = Linear4bit(128, 32, quant_type="fp4").quantize_weight(block_size=32)
    fresh = Linear4bit(128, 32, quant_type="fp4")
    assert not fresh.is_quantized
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_quantized and fresh.block_size == 32 and isinstance(fresh.bias, nn.Parameter)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), layer(x))


def test_linear4bit_refuses_8bit_scheme() -> None:
    with pytest.raises(ValueError, match="4-bit"):
        Linear4bit(64, 64, quant_type="int8")


@pytest.mark.parametrize(("block", "scales_per_row"), [(64, 4), (None, 1)])
def test_linear8bitlt(block: int | None, scales_per_row: int) -> None:
    layer = Linear8bitLt(256, 32)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.quantize_weight(block_size=block)
    assert layer.scheme == "int8" and layer.weight.dtype == torch.int8
    assert layer.weight_scale.shape == (32, scales_per_row)
    x = torch.randn(4, 256)
    ref = _reference(x, weight, bias, scheme="int8", block_size=block or 256)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    fresh = Linear8bitLt(256, 32)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))


def test_compute_dtype_argument() -> None:
    layer = Linear8bitLt(64, 16, compute_dtype=torch.bfloat16).quantize_weight()
    x = torch.randn(2, 64)
    w = dequantize(layer.quant_state(), dtype=torch.bfloat16)
    expected = nn.functional.linear(x.bfloat16(), w, layer.bias.bfloat16()).float()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_forward_goes_through_the_kernel_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    module = QuantLinear.from_linear(_linear(), "nf4")
    seen = []

    def fake_kernel(x: torch.Tensor, state: object, bias: torch.Tensor | None, scale: object) -> torch.Tensor:
        seen.append(state)
        return functional.dequantize_linear(x, state, bias, scale)

    monkeypatch.setitem(functional._OVERRIDES, ("cpu", "nf4"), fake_kernel)
    x = torch.randn(2, IN)
    module(x)
    assert len(seen) == 1 and seen[0].qdata.data_ptr() == module.weight.data_ptr()  # packed, not copied


def test_static_int8_input_equals_integer_matmul() -> None:
    """W8A8 (int8-static): int8 activations with the static scale times int8 weights, exactly in float64."""
    linear = _linear()
    x = torch.randn(6, IN)
    input_scale = x.abs().amax() / 127 * 0.8  # a calibrated range a bit below this batch's: some clipping
    module = QuantLinear.from_linear(linear, "int8-static", input_scale=input_scale)
    assert module.block_size == IN and module.weight_scale.shape == (OUT, 1)
    x_int = torch.round(x / input_scale).clamp(-127, 127)
    acc = x_int.double() @ module.weight.double().T  # the int32 accumulator of an int8 x int8 GEMM
    ref = acc * input_scale.double() * module.weight_scale.double().T + linear.bias.detach().double()
    torch.testing.assert_close(module(x).double(), ref, rtol=1e-5, atol=1e-5)
    # The scale is part of the state dict, survives a round trip and is never cast by .to(dtype).
    fresh = QuantLinear(IN, OUT, scheme="int8-static")
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(x), module(x)) and "static int8 input" in repr(fresh)
    fresh.to(torch.bfloat16)
    assert fresh.input_scale.dtype == torch.float32 and torch.equal(fresh.input_scale, input_scale)


def test_per_row_scheme_refuses_a_block() -> None:
    with pytest.raises(ValueError, match="one scale per row"):
        QuantLinear(IN, OUT, scheme="int8-static", block_size=64)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown scheme"):
        QuantLinear(IN, OUT, scheme="nf5")
    with pytest.raises(ValueError, match="symmetric"):
        QuantLinear(IN, OUT, scheme="nf4", symmetric=False)
    with pytest.raises(ValueError, match="not quantized yet"):
        Linear4bit(IN, OUT).quant_state()
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear.from_state(quantize(torch.randn(4, 4, 64), "nf4"))


def test_int8_static_int_mm_path_equals_fake_quantized_matmul() -> None:
    """The torch._int_mm kernel (registered for CUDA) run on the CPU against the dequantize path."""
    from quantize_cli.nn.functional import dequantize_linear, int8_static_linear

    w = torch.randn(48, 64)
    state = quantize(w, "int8-static")
    x = torch.randn(3, 5, 64)
    s = x.abs().amax() / 127 * 0.8  # clip a little so the clamp is exercised
    bias = torch.randn(48)
    got = int8_static_linear(x, state, bias, s)
    want = dequantize_linear(x.double(), state, bias.double(), s)
    assert got.shape == (3, 5, 48)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Exact integer check: the int32 accumulator equals the float64 product of the codes.
    xq = torch.round(x.reshape(-1, 64) / s).clamp(-127, 127)
    exact = (xq.double() @ state.qdata.double().T) * s.double() * state.scale.double().reshape(1, -1) + bias.double()
    torch.testing.assert_close(got.reshape(-1, 48).double(), exact, rtol=1e-6, atol=1e-5)


def test_fp8_activations_round_inputs_in_groups_of_the_block() -> None:
    """Inside ``fp8_activations`` an fp8 QuantLinear rounds each row's 128-column groups of its input to
    E4M3 (scale amax / 448); checked against the same rounding done column group by column group in
    float64 with torch's own E4M3 cast, times the dequantized weight in float64. Outside, weight-only."""
    torch.manual_seed(0)
    linear = nn.Linear(300, 64)  # K = 300: the last group is padded
    module = QuantLinear.from_linear(linear, "fp8")
    x = torch.randn(3, 300) * torch.logspace(-2, 1, 300)
    xp = torch.nn.functional.pad(x, (0, 84)).double()
    groups = []
    for g in range(3):
        part = xp[:, 128 * g : 128 * (g + 1)]
        s = part.abs().amax(dim=1, keepdim=True).float().double() / 448  # amax / 448 in fp32, as the op
        s = s.float().double()
        groups.append((part / s).float().to(torch.float8_e4m3fn).double() * s)
    want = torch.cat(groups, 1)[:, :300] @ module.dequantize_weight().double().T + linear.bias.detach().double()
    with functional.fp8_activations():
        got = module(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    plain = module(x)  # the context is over: weight-only again
    torch.testing.assert_close(plain, functional.dequantize_linear(x, module.quant_state(), module.bias))
    assert (got - plain).abs().max() > 1e-3  # the activation rounding is visible
