"""Layer-wise calibration against a plain full-model forward with hooks, observers against brute force."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantize_cli.calibration import CalibrationSettings, CalibrationStats, calibrate
from quantize_cli.calibration.layerwise import LayerwiseRun, build_skeleton, decoder_layers
from quantize_cli.calibration.observers import INT8_MAX, make_observer
from quantize_cli.cli import app
from quantize_cli.errors import QuantaError

PROSE = """The river rose through the night, and by morning the low fields along the valley were under
water. Farmers moved their animals to the ridge, where the old stone barns had stood for two hundred years.
Nobody in the village could remember a flood like it, although the records in the church described one
in the winter of a year when the bridge was swept away and rebuilt in timber. The new bridge of iron
held, and the mill kept turning, because the miller had raised the wheel after the last great storm.
By the third day the water began to fall. Mud covered the roads, the orchards smelled of silt, and the
children found fish stranded in the ditches. The council met in the school hall to count the damage and
to decide whether the embankment should be built higher, or whether the fields should be left to the river.
"""


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(PROSE * 6)
    return path


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from _models import smollm2_dir

    return smollm2_dir()


def test_observers_against_hand_computation() -> None:
    x = torch.randn(1000, 8)
    x[3, 2] = -40.0
    mm = make_observer("minmax", per_channel=True)
    mm.update(x[:500])
    mm.update(x[500:])
    assert torch.equal(mm.result(), x.abs().amax(dim=0))
    pc = make_observer("percentile", per_channel=False, percentile=99.0)
    pc.update(x)
    assert pc.result().item() == pytest.approx(torch.sort(x.abs().reshape(-1)).values[7919].item())


def test_histogram_clip_is_near_the_true_mse_optimum() -> None:
    x = torch.randn(200_000, 1) * torch.exp(torch.randn(200_000, 1))  # heavy tails: clipping pays
    obs = make_observer("histogram", per_channel=False)
    obs.update(x)
    clip = obs.result().item()

    def mse(c: float) -> float:  # actual int8 quantize-dequantize error at clip c
        s = c / INT8_MAX
        return ((torch.clamp(torch.round(x / s), -127, 127) * s - x) ** 2).mean().item()

    grid = [x.abs().max().item() * 2 ** (-k / 32) for k in range(0, 32 * 6)]
    best = min(mse(c) for c in grid)
    assert clip < x.abs().max().item()  # it clips
    assert mse(clip) <= best * 1.1
    assert mse(clip) < mse(x.abs().max().item()) * 0.9


def _hooked_full_model(model_dir: Path, windows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Independent reference: the whole model in fp32, forward hooks on every Linear."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acc: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name: str):
        def f(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            d = acc.setdefault(name, {"xtx": 0, "n": 0, "amax": torch.zeros(x.shape[1], dtype=torch.float64)})
            d["xtx"] = d["xtx"] + x.T @ x
            d["n"] += x.shape[0]
            d["amax"] = torch.maximum(d["amax"], x.abs().amax(dim=0))

        return f

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for w in windows:
            model(w.unsqueeze(0))
    return acc


def _assert_stats_match(collected: dict, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    """Layer-wise statistics against the hooked full forward: every Linear, its input range and X^T X."""
    assert set(collected) == set(reference)
    for name, ref in reference.items():
        st = collected[name]
        assert torch.allclose(st.observer.result().double(), ref["amax"], rtol=1e-4, atol=1e-5), name
        layer_prefix = ".".join(name.split(".")[:3])  # model.layers.<i>
        owner = collected[f"{layer_prefix}.{st.shares_input_with}"] if st.shares_input_with else st
        h = owner.hessian.double() / owner.tokens
        ref_h = ref["xtx"] / ref["n"]
        assert (h - ref_h).norm() / ref_h.norm() < 1e-4, name


def test_layerwise_matches_full_forward_and_holds_one_layer(smollm2: Path, text_file: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from quantize_cli.data import token_windows
    from quantize_cli.pipeline.source import resolve_source

    windows = token_windows(AutoTokenizer.from_pretrained(smollm2), str(text_file), 64, 3, purpose="calibration")
    reference = _hooked_full_model(smollm2, windows)

    source = resolve_source(str(smollm2))
    resident: list[int] = []
    collected: dict[str, dict] = {}

    def on_layer(index, prefix, stats) -> None:
        for name, st in stats.items():
            collected[f"{prefix}.{name}"] = st

    run = LayerwiseRun(source, CalibrationSettings(observer="minmax", per_channel=True))
    # Count the parameters that are real (not meta) while each layer runs: only that layer's.
    import quantize_cli.calibration.layerwise as lw

    real_run_layer = lw.run_layer

    def counting_run_layer(layer, hidden, args, kwargs, stats):
        model = run.model  # the whole skeleton: only this layer may be real
        resident.append(sum(p.numel() for p in model.parameters() if p.device.type != "meta"))
        return real_run_layer(layer, hidden, args, kwargs, stats)

    lw.run_layer = counting_run_layer
    try:
        run.run(windows, on_layer)
    finally:
        lw.run_layer = real_run_layer
    per_layer = 135_000_000 // 30  # ~3.6M parameters in one SmolLM2 decoder layer, well under the whole model
    assert len(resident) == 30 and max(resident) < per_layer * 1.5

    _assert_stats_match(collected, reference)
    assert collected["model.layers.0.self_attn.k_proj"].shares_input_with == "self_attn.q_proj"
    assert collected["model.layers.0.mlp.up_proj"].shares_input_with == "mlp.gate_proj"
    assert collected["model.layers.0.self_attn.o_proj"].shares_input_with is None


def test_calibrate_writes_a_readable_file(smollm2: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "calib.safetensors"
    calibrate(str(smollm2), str(text_file), out, samples=2, seq_len=32, show_progress=False)
    stats = CalibrationStats(out)
    assert len(stats.linears) == 30 * 7
    name = "model.layers.5.self_attn.v_proj"
    assert stats.hessian(name).shape == (576, 576)
    assert torch.equal(stats.hessian(name), stats.hessian("model.layers.5.self_attn.q_proj"))
    assert stats.input_scale(name).item() == pytest.approx(stats.input_range(name).max().item() / 127)
    assert stats.metadata["samples"] == 2 and stats.metadata["observer"] == "minmax"
    assert not list(tmp_path.glob(".quanta-calib-*"))  # scratch folder removed


def test_calibrate_cli_errors(smollm2: Path, text_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    existing = tmp_path / "c.safetensors"
    existing.write_bytes(b"x")
    cases = [
        ([str(smollm2), "--data", str(text_file), "--out", str(existing)], "already exists"),
        ([str(smollm2), "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "a.st")], "unknown data"),
        ([str(tmp_path / "missing"), "--data", str(text_file), "--out", str(tmp_path / "b.st")], "not found"),
        ([str(smollm2), "--data", str(text_file), "--observer", "magic", "--out", str(tmp_path / "d.st")], "observer"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["calibrate", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "a.st").exists() and not list(tmp_path.glob(".quanta-calib-*"))


def test_model_without_one_layer_list_is_refused(smollm2: Path) -> None:
    import json

    config = json.loads((smollm2 / "config.json").read_text())
    model = build_skeleton(config)
    model.config.num_hidden_layers = 7  # no ModuleList of that length
    with pytest.raises(QuantaError, match="one ModuleList"):
        decoder_layers(model)


def test_convert_calibrates_and_converts_in_one_run(text_file: Path, tmp_path: Path) -> None:
    """`quanta convert --scheme int8-static --data FILE`: calibration runs first, its scratch file goes away,
    and the stored input scales equal those of a separate `quanta calibrate` on the same data with the
    settings convert picks for W8A8 (the histogram clip; smoothing does not apply to BERT)."""
    import json

    from _models import minilm_dir
    from safetensors import safe_open

    out = tmp_path / "w8a8"
    args = ["--data", str(text_file), "--samples", "2", "--seq-len", "32"]
    result = CliRunner().invoke(
        app, ["convert", str(minilm_dir()), "--scheme", "int8-static", "--out", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8"]  # no scratch statistics left behind
    stats_file = tmp_path / "separate.safetensors"
    settings = CalibrationSettings(observer="histogram")
    calibrate(str(minilm_dir()), str(text_file), stats_file, 2, 32, settings, show_progress=False)
    stats = CalibrationStats(stats_file)
    entries = json.loads((out / "quantization_map.json").read_text())["tensors"]
    name = "encoder.layer.2.intermediate.dense.weight"
    assert entries[name]["input_scale"] == "encoder.layer.2.intermediate.dense.input_scale"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("encoder.layer.2.intermediate.dense.input_scale")
    assert torch.equal(stored, stats.input_scale("encoder.layer.2.intermediate.dense"))


def test_observed_layer_keeps_no_inputs_alive() -> None:
    """After a layer is calibrated nothing of it references the windows' Linear inputs: the layer object
    lives on (on the meta device) for the whole run, so anything it kept would add up layer by layer
    (it did: the last window's inputs, ~35 MB per layer of a 3B model)."""
    import gc
    import weakref

    from quantize_cli.calibration.layerwise import observing, run_layer

    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    hidden = [torch.randn(4, 16) for _ in range(3)]
    refs = [weakref.ref(h) for h in hidden]
    with observing(layer, CalibrationSettings(hessian=True, smooth=None)) as stats:
        out = run_layer(layer, hidden, (), {}, stats)
    assert set(stats) == {"0", "2"} and stats["0"].tokens == 12
    assert not hasattr(layer, "_quanta_seen")
    del hidden, out
    gc.collect()
    assert all(r() is None for r in refs)


# Tiny random members of each family the layer-wise calibration names (built from their transformers
# configs: no checkpoint to fetch). Gemma 2 and 3 alternate sliding-window and full-attention layers, and
# Gemma 3 gives them rotary embeddings of different bases: each layer must get its own arguments. The
# windows are longer than the sliding window so that the difference shows.
_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=128,
)  # fmt: skip
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 8},
    "gemma2": {"sliding_window": 8, "layer_types": _ALTERNATING},
    "gemma3_text": {"sliding_window": 8, "layer_types": _ALTERNATING},
    "phi3": {"pad_token_id": 0},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(request.param, **_TINY, **FAMILIES[request.param])
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # lift the default 0.02-scale initialisation so the layers' inputs differ visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(10.0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def test_layerwise_matches_full_forward_on_each_family(tiny_family: Path) -> None:
    from quantize_cli.pipeline.source import resolve_source

    windows = torch.randint(0, _TINY["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(1))
    reference = _hooked_full_model(tiny_family, windows)
    collected: dict[str, object] = {}

    def on_layer(index, prefix, stats) -> None:
        for name, st in stats.items():
            collected[f"{prefix}.{name}"] = st

    LayerwiseRun(resolve_source(str(tiny_family)), CalibrationSettings(observer="minmax", per_channel=True)).run(
        windows, on_layer
    )
    _assert_stats_match(collected, reference)


class _ToyEmbedding(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float()[..., None].expand(*input_ids.shape, 4)


class _ToyModel(torch.nn.Module):
    """Embeds token ids as constant vectors (no parameters to read) and calls the first ``called`` of its
    three layers, telling each its index."""

    def __init__(self, called: int) -> None:
        super().__init__()
        self.called = called
        self.embed = _ToyEmbedding()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> None:
        return None

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers[: self.called]):
            h = layer(h, position=i)
        return h


def test_layer_inputs_are_each_layers_own_and_a_model_that_skips_layers_is_refused() -> None:
    from quantize_cli.calibration.layerwise import layer_inputs

    windows = torch.arange(6).reshape(2, 3)
    model = _ToyModel(called=3)
    hidden, per_layer = layer_inputs(model, "layers", model.layers, windows, CalibrationSettings(), None)
    assert [h.shape for h in hidden] == [(1, 3, 4), (1, 3, 4)] and torch.equal(hidden[1][0, :, 0], windows[1].float())
    assert [kwargs for _, kwargs in per_layer] == [{"position": 0}, {"position": 1}, {"position": 2}]
    assert all(isinstance(layer, torch.nn.Identity) for layer in model.layers)  # the stand-ins are gone

    model = _ToyModel(called=2)
    with pytest.raises(QuantaError, match="did not call its 3 decoder layers in turn"):
        layer_inputs(model, "layers", model.layers, windows, CalibrationSettings(), None)
    assert all(isinstance(layer, torch.nn.Identity) for layer in model.layers)
