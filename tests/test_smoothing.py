"""SmoothQuant smoothing: folding is exact in float, the alpha search lowers W8A8 error, the map records it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantize_cli.algorithms import ChannelScale, Heads, fold_scales, parse_smooth, smoothing_factors, smoothing_groups
from quantize_cli.calibration import CalibrationSettings, CalibrationStats, calibrate
from quantize_cli.calibration.observers import HistogramObserver, scaled_range
from quantize_cli.cli import app
from quantize_cli.pipeline import convert
from quantize_cli.pipeline.convert import CalibrationInput
from quantize_cli.pipeline.plan import make_plan
from quantize_cli.pipeline.recipe import build_recipe
from quantize_cli.pipeline.smoothing import plan_smoothing
from quantize_cli.pipeline.source import SourceReader, resolve_source

transformers = pytest.importorskip("transformers")

PROSE = """The river rose through the night, and by morning the low fields along the valley were under
water. Farmers moved their animals to the ridge, where the old stone barns had stood for two hundred years.
Nobody in the village could remember a flood like it, although the records in the church described one
in the winter of a year when the bridge was swept away and rebuilt in timber. The new bridge of iron
held, and the mill kept turning, because the miller had raised the wheel after the last great storm.
"""
EVAL_TEXT = """At the harbour the fishing boats stayed tied up for a week. The wind turned to the north, the sky
cleared, and the harbour master walked the quay each evening to look at the ropes and the tide marks."""
OUTLIER_CHANNELS = (3, 17, 40)


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (4 query heads on 2 kv heads) whose activations have outlier channels, as trained
    LLMs do: a few channels of each norm weight and of up_proj's rows are 40x larger."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
                norm.weight[list(OUTLIER_CHANNELS)] *= 40
            layer.mlp.up_proj.weight[list(OUTLIER_CHANNELS)] *= 40
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved as a HF folder, with SmolLM2's tokenizer (calibration tokenizes text)."""
    from _models import smollm2_dir

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(PROSE * 8)
    return path


@pytest.fixture(scope="module")
def calib(tiny_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    settings = CalibrationSettings(smooth="auto", hessian=False)
    calibrate(str(tiny_dir), str(text_file), out, samples=4, seq_len=64, settings=settings, show_progress=False)
    return out


def _layer_groups(model: torch.nn.Module) -> list:
    config = model.config.to_dict()
    names = [n for n, _ in model.model.layers[0].named_modules()]
    return [(i, g) for i in range(len(model.model.layers)) for g in smoothing_groups(names, config)]


def test_folding_random_factors_is_exact_in_float() -> None:
    """Any positive factors, folded into norms, up_proj and v_proj rows: the model computes the same logits."""
    model = tiny_llama()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    g = torch.Generator().manual_seed(2)
    folded = []
    for i, group in _layer_groups(model):
        width = model.model.layers[i].get_submodule(group.linears[0]).in_features
        weight_max = torch.rand(width, generator=g) + 0.1
        act_max = torch.exp(3 * torch.randn(width, generator=g))
        folded.append((group.prefixed(f"model.layers.{i}"), smoothing_factors(act_max, weight_max, 0.6, group.heads)))
    assert {grp.kind for grp, _ in folded} == {"norm", "rows"} and any(grp.heads for grp, _ in folded)
    scales = fold_scales(folded)
    state = {k: scales[k].apply(v) if k in scales else v for k, v in model.state_dict().items()}
    v_proj = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.equal(state[v_proj], model.state_dict()[v_proj])
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_gqa_factors_are_tied_across_query_heads() -> None:
    heads = Heads(kv_heads=2, group=3, head_dim=4)
    s = smoothing_factors(torch.rand(24) * 10, torch.rand(24), 0.5, heads)
    per_head = s.reshape(2, 3, 4)
    assert torch.equal(per_head, per_head[:, :1].expand(-1, 3, -1))
    assert torch.equal(heads.expand(heads.tie(s)), s)


def test_channel_scale_rows_and_columns() -> None:
    w = torch.randn(3, 4)
    rows, cols = torch.rand(3) + 0.5, torch.rand(4) + 0.5
    both = ChannelScale(rows=rows).merged(ChannelScale(cols=cols))
    torch.testing.assert_close(both.apply(w), rows[:, None] * w * cols)
    torch.testing.assert_close(ChannelScale(rows=rows).apply(w[:, 0]), rows * w[:, 0])


def test_scaled_range_matches_observing_the_divided_input() -> None:
    """The range of x / s from a per-channel histogram of x equals observing x / s itself (powers of two: the
    bin shift is exact)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) * torch.exp(2 * torch.randn(16, generator=g))
    s = torch.exp2(torch.randint(-4, 5, (16,), generator=g).float())
    channels = HistogramObserver(per_channel=True)
    channels.update(x)
    direct = HistogramObserver(per_channel=False)
    direct.update(x / s)
    assert scaled_range(channels, s, "minmax") == (x / s).abs().max()
    torch.testing.assert_close(scaled_range(channels, s, "histogram"), direct.result()[0])
    pooled = (x / s).abs().flatten().sort().values
    p99 = scaled_range(channels, s, "percentile", 99.0)
    assert pooled[int(0.99 * pooled.numel()) - 1] <= p99 <= pooled[int(0.99 * pooled.numel()) - 1] * 2 ** (1 / 16)


def test_parse_smooth() -> None:
    assert parse_smooth("auto") == "auto" and parse_smooth("off") is None and parse_smooth("0.5") == 0.5
    for bad in ("1.5", "high"):
        with pytest.raises(ValueError, match="smooth"):
            parse_smooth(bad)


def test_converter_folding_is_exact_in_float(tiny_dir: Path, calib: Path) -> None:
    """The converter's own per-tensor scalings, from real statistics, applied in fp32: same logits."""
    stats = CalibrationStats(calib)
    assert len(stats.smoothing_groups) == 2 * 4  # q/k/v, o, gate/up, down in each layer
    source = resolve_source(str(tiny_dir))
    plan = make_plan(source, build_recipe(scheme="int8-static"), 1 << 30)
    warnings: list[str] = []
    smoothing = plan_smoothing(plan, stats, "auto", warnings.append)
    assert smoothing is not None and not warnings
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
    with SourceReader(source) as reader:
        original = {name: reader.get(name).float() for name in source.tensors}
    state = {name: smoothing.apply(name, t) for name, t in original.items()}
    changed = {name for name in state if not torch.equal(state[name], original[name])}
    assert "model.layers.1.post_attention_layernorm.weight" in changed and "model.norm.weight" not in changed
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_only_known_decoder_layouts_are_smoothed() -> None:
    names = [n for n, _ in tiny_llama().model.layers[0].named_modules()]
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
    assert [g.source for g in smoothing_groups(names, config)] == [
        "input_layernorm", "post_attention_layernorm", "mlp.up_proj", "self_attn.v_proj",
    ]  # fmt: skip
    assert smoothing_groups(names, {**config, "model_type": "gemma"}) == []  # (1 + w) norms: not this folding
    assert smoothing_groups(["encoder.layer.0.attention"], {"model_type": "bert"}) == []


def _layer_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda _m, _i, out: outs.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return outs


def test_w8a8_with_smoothing_has_lower_layer_error_and_the_map_records_it(
    tiny_dir: Path, calib: Path, tmp_path: Path
) -> None:
    from quantize_cli.reload import load_quantized

    outs = {}
    for smooth in ("auto", "off"):
        outs[smooth] = tmp_path / smooth
        convert(str(tiny_dir), "int8-static", out=outs[smooth], progress=False, device="cpu",
                calibration=CalibrationInput(str(calib), smooth=smooth))  # fmt: skip
    qmap = json.loads((outs["auto"] / "quantization_map.json").read_text())
    assert qmap["smoothing"]["method"] == "smoothquant" and qmap["smoothing"]["smooth"] == "auto"
    groups = qmap["smoothing"]["groups"]
    assert {g["source"] for g in groups} >= {"model.layers.0.input_layernorm", "model.layers.0.mlp.up_proj"}
    entry = qmap["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert entry["smoothing_alpha"] == next(g["alpha"] for g in groups if g["source"] == "model.layers.0.mlp.up_proj")
    off = json.loads((outs["off"] / "quantization_map.json").read_text())
    assert "smoothing" not in off and "smoothing_alpha" not in off["tensors"]["model.layers.0.mlp.down_proj.weight"]

    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    # Held-out text: static ranges hold for text like the calibration's (uniformly random token ids would
    # reach embeddings calibration never saw).
    ids = transformers.AutoTokenizer.from_pretrained(tiny_dir)(EVAL_TEXT, return_tensors="pt").input_ids
    want = _layer_outputs(reference, ids)
    errors = {}
    for smooth, folder in outs.items():
        got = _layer_outputs(load_quantized(folder, dtype=torch.float32), ids)
        errors[smooth] = [float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)]
    assert all(a < 0.5 * o for a, o in zip(errors["auto"], errors["off"], strict=True)), errors


def test_convert_smooth_alpha_must_match_the_file(tiny_dir: Path, calib: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["convert", str(tiny_dir), "--scheme", "int8-static", "--calibration", str(calib), "--smooth", "0.5",
         "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert result.exit_code == 2 and "smooth=auto" in result.output, result.output
    assert "Traceback" not in result.output
