"""``load_quantized`` / ``quanta reload`` on folders written by the real converter, for every scheme.

The reference is independent of the reload path: transformers' own ``from_pretrained`` of the source
model, with each weight the map quantizes replaced in place by ``dequantize(quantize(W))``. The reloaded
model (QuantLinear modules, packed buffers, meta-device build, streamed assign) must give the same
logits / hidden states.

CPU time: SmolLM2 is converted with only blocks 0-2 quantized for the per-scheme sweep (21 Linears of
every shape the model has; the other 27 blocks are plain bf16 and still run), and once in full with nf4
for generation, the fresh-process run and ``--dequantize-to``. MiniLM is converted in full for every scheme.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import minilm_dir, smollm2_dir
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from quantize_cli import SCHEMES, QuantLinear, dequantize, load_quantized, quantize
from quantize_cli.calibration import calibrate
from quantize_cli.cli import app
from quantize_cli.errors import QuantaError
from quantize_cli.format import MAP_FILE
from quantize_cli.pipeline import convert
from quantize_cli.pipeline.convert import CalibrationInput
from quantize_cli.reload import dequantize_folder, generate, read_map, summarize
from quantize_cli.schemes.base import parse_dtype

runner = CliRunner()
LATER_BLOCKS = [r"re:model\.layers\.([3-9]|[12][0-9])\..*"]  # keep blocks 3-29 unquantized
PROMPT = "What is the capital of France?"
NEW_TOKENS = 6
SENTENCES = ["Quantized weights stay packed.", "A second, somewhat longer sentence about tensors."]


# -- folders and references -----------------------------------------------------------------------------
_FOLDERS: dict[tuple, Path] = {}


def _converted(factory: pytest.TempPathFactory, source: Path, **kwargs: Any) -> Path:
    """``convert(source, **kwargs)`` once per test session; later calls with the same arguments reuse it."""
    key = (source, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _FOLDERS:
        out = factory.mktemp(f"{source.name[:8]}-{kwargs.get('scheme', 'recipe')}") / "out"
        _FOLDERS[key] = convert(str(source), out=str(out), device="cpu", progress=False, **kwargs).out
    return _FOLDERS[key]


CALIBRATION_TEXT = (
    "The lighthouse keeper climbed the stairs each evening to light the lamp. Ships passed the rocks in the "
    "dark, their crews trusting the beam that swept across the water every few seconds. In winter the storms "
    "came from the north and the keeper stayed awake through the night, listening to the waves. "
) * 8


def _calibration_file(factory: pytest.TempPathFactory, source: Path) -> Path:
    """Statistics from `quanta calibrate`'s library function on a short local text (one per model)."""
    key = (source, "calibration")
    if key not in _FOLDERS:
        folder = factory.mktemp(f"{source.name[:8]}-calib")
        text = folder / "calib.txt"
        text.write_text(CALIBRATION_TEXT)
        _FOLDERS[key] = calibrate(str(source), str(text), folder / "calib.safetensors", samples=2, seq_len=32,
                                  show_progress=False)  # fmt: skip
    return _FOLDERS[key]


def _folder(
    factory: pytest.TempPathFactory, source: Path, scheme: str, ref: nn.Module, inputs: dict, **kw: Any
) -> Path:
    """The converter's folder for ``scheme``; a calibrated scheme gets a calibration file first."""
    if SCHEMES[scheme].needs_calibration:
        kw["calibration"] = CalibrationInput(file=_calibration_file(factory, source))
    return _converted(factory, source, scheme=scheme, **kw)


@contextlib.contextmanager
def dequantized_weights(model: nn.Module, folder: Path) -> Iterator[int]:
    """Replace, in place, each weight the folder's map quantizes by ``dequantize(quantize(W))``; restore after.

    ``W`` is the model's own weight, seen in the dtype the map records; scheme, block size and options
    come from the map entry. A stored static activation scale ``P.input_scale`` becomes a forward
    pre-hook rounding the Linear's input to int8 with it. Yields the number of weights replaced.
    """
    entries = json.loads((folder / MAP_FILE).read_text())["tensors"]
    saved: dict[str, torch.Tensor] = {}
    hooks = []
    try:
        for name in entries:
            scale = _stored(folder, name.removesuffix("weight") + "input_scale")
            if scale is not None:
                hooks.append(model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
                    lambda _m, args, s=scale: torch.round(args[0].float() / s).clamp(-127, 127).mul(s).to(args[0].dtype)
                ))  # fmt: skip
        with torch.no_grad():
            for name, entry in entries.items():
                param = model.get_parameter(name)
                saved[name] = param.detach().clone()
                options = {k: entry[k] for k in ("symmetric",) if k in entry}
                weight = param.detach().to(parse_dtype(entry["dtype"]))
                param.copy_(dequantize(quantize(weight, entry["scheme"], entry["block_size"], **options)))
        yield len(saved)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, original in saved.items():
                model.get_parameter(name).copy_(original)


def _stored(folder: Path, key: str) -> torch.Tensor | None:
    for shard in folder.glob("model*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    return None


@pytest.fixture(scope="module")
def smol_ref() -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir()).eval()


@pytest.fixture(scope="module")
def smol_ids() -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    messages = [{"role": "user", "content": PROMPT}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


@pytest.fixture(scope="module")
def nf4_reference(smol_nf4: Path, smol_ref: nn.Module, smol_ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of the chat-templated PROMPT and its greedy continuation, by transformers' model with all 210
    block Linear weights replaced by their nf4 ``dequantize(quantize(W))``."""
    from transformers import AutoTokenizer

    with dequantized_weights(smol_ref, smol_nf4) as replaced, torch.no_grad():
        assert replaced == 210
        logits = _logits(smol_ref, smol_ids)
        ids = smol_ref.generate(smol_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    return logits, tokenizer.decode(ids[0, smol_ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def minilm_ref() -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir()).eval()


@pytest.fixture(scope="module")
def minilm_inputs() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(minilm_dir())(SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def smol_nf4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _converted(tmp_path_factory, smollm2_dir(), scheme="nf4")


@pytest.fixture(scope="module")
def minilm_nf4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _converted(tmp_path_factory, minilm_dir(), scheme="nf4")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state, out.pooler_output


def _assert_packed(model: nn.Module, scheme: str, count: int) -> None:
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == count
    assert {m.scheme for m in quant} == {scheme}
    spec = SCHEMES[scheme]
    for m in quant:  # codes as stored, never a float copy of the weight
        assert not isinstance(m.weight, nn.Parameter) and m.weight.shape[0] == m.out_features
        assert m.weight.element_size() == (1 if spec.bits < 16 else 2)
        assert m.weight.shape[1] * (2 if spec.packed else 1) >= m.in_features


# -- every scheme, both models ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_smollm2_reload_equals_dequantized_model(
    scheme: str, tmp_path_factory: pytest.TempPathFactory, smol_ref: nn.Module, smol_ids: torch.Tensor
) -> None:
    folder = _folder(tmp_path_factory, smollm2_dir(), scheme, smol_ref, {"input_ids": smol_ids}, ignore=LATER_BLOCKS)
    model = load_quantized(folder)
    _assert_packed(model, scheme, count=3 * 7)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after the streamed load
    got = _logits(model, smol_ids)
    with dequantized_weights(smol_ref, folder) as replaced:
        want = _logits(smol_ref, smol_ids)
    assert replaced == 21 and got.dtype == want.dtype == torch.bfloat16
    # Same bf16 arithmetic on both sides: equal up to float reassociation (observed: bit for bit).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_minilm_reload_equals_dequantized_model(
    scheme: str,
    tmp_path_factory: pytest.TempPathFactory,
    minilm_ref: nn.Module,
    minilm_inputs: dict[str, torch.Tensor],
) -> None:
    folder = _folder(tmp_path_factory, minilm_dir(), scheme, minilm_ref, minilm_inputs)
    model = load_quantized(folder)
    assert type(model).__name__ == "BertModel" and not model.training
    _assert_packed(model, scheme, count=6 * 6)
    got = _hidden(model, minilm_inputs)
    with dequantized_weights(minilm_ref, folder) as replaced:
        want = _hidden(minilm_ref, minilm_inputs)
    assert replaced == 36
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# -- nf4 in full: generation, fresh process, CLI, dtype -------------------------------------------------
@pytest.mark.slow
def test_smollm2_nf4_full_logits_and_greedy_generation(
    smol_nf4: Path, smol_ids: torch.Tensor, nf4_reference: tuple[torch.Tensor, str]
) -> None:
    want, want_text = nf4_reference
    model = load_quantized(smol_nf4)
    _assert_packed(model, "nf4", count=30 * 7)
    got = _logits(model, smol_ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
    text = generate(model, smol_nf4, PROMPT, max_new_tokens=NEW_TOKENS)  # through the chat template
    assert text == want_text
    assert re.search(r"[A-Za-z]{3}", text), text


@pytest.mark.slow
def test_reload_in_a_fresh_process(smol_nf4: Path, nf4_reference: tuple[torch.Tensor, str]) -> None:
    cmd = [sys.executable, "-m", "quantize_cli", "reload", str(smol_nf4), "--prompt", PROMPT,
           "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == nf4_reference[1]


@pytest.mark.slow
def test_cli_summary(smol_nf4: Path) -> None:
    result = runner.invoke(app, ["reload", str(smol_nf4), "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "210 QuantLinear (210 nf4)" in result.output
    assert re.search(r"3\.\d+x smaller", result.output)


@pytest.mark.slow
def test_mixed_recipe_with_float32_compute(tmp_path_factory: pytest.TempPathFactory, smol_ids: torch.Tensor) -> None:
    """int8 + asymmetric int4 (zero points) + nf4 in one model, loaded with dtype=float32."""
    from transformers import AutoModelForCausalLM

    recipe = Path(__file__).parents[1] / "recipes" / "mixed.yaml"
    folder = _converted(tmp_path_factory, smollm2_dir(), recipe=str(recipe), ignore=LATER_BLOCKS)
    entries = read_map(folder)["tensors"]
    assert {e["scheme"] for e in entries.values()} == {"nf4", "int8", "int4"}
    assert any(e.get("symmetric") is False for e in entries.values())
    model = load_quantized(folder, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == len(entries) and all(m.compute_dtype == torch.float32 for m in quant)
    assert any(m.weight_zero_point is not None for m in quant)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    got = _logits(model, smol_ids)
    with dequantized_weights(ref, folder):  # quantized from the bf16 weight, as the converter did
        want = _logits(ref, smol_ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_minilm_bfloat16_compute(minilm_nf4: Path, minilm_inputs: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModel

    model = load_quantized(minilm_nf4, dtype=torch.bfloat16)
    ref = AutoModel.from_pretrained(minilm_dir()).eval()
    with dequantized_weights(ref, minilm_nf4):
        ref = ref.to(torch.bfloat16)  # the fp32 dequantized weight, cast: what compute_dtype means
        want = _hidden(ref, minilm_inputs)
    got = _hidden(model, minilm_inputs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.slow
def test_quantized_embeddings_are_dequantized_at_load(
    tmp_path_factory: pytest.TempPathFactory,
    minilm_ref: nn.Module,
    minilm_inputs: dict[str, torch.Tensor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """targets: all-2d also quantizes the embeddings (no Linear to hold them): reload dequantizes those."""
    recipe = tmp_path_factory.mktemp("recipe") / "all2d.yaml"
    recipe.write_text("scheme: int8\ntargets: all-2d\n")
    folder = _converted(tmp_path_factory, minilm_dir(), recipe=str(recipe))
    entries = read_map(folder)["tensors"]
    assert "embeddings.word_embeddings.weight" in entries
    model = load_quantized(folder)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 6 * 6 + 1  # the block Linears and the pooler
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    assert "dequantized at load" in caplog.text
    with dequantized_weights(minilm_ref, folder) as replaced:
        want = _hidden(minilm_ref, minilm_inputs)
    assert replaced == len(entries)
    for g, w in zip(_hidden(model, minilm_inputs), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# -- shards and --dequantize-to ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_folder_reloads_and_dequantizes(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    minilm_ref: nn.Module,
    minilm_inputs: dict[str, torch.Tensor],
) -> None:
    from transformers import AutoModel

    folder = _converted(tmp_path_factory, minilm_dir(), scheme="int8", max_shard_size="10MB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    with dequantized_weights(minilm_ref, folder):
        want = _hidden(minilm_ref, minilm_inputs)
    got = _hidden(load_quantized(folder), minilm_inputs)
    out = dequantize_folder(folder, tmp_path / "float")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any(k.endswith("_scale") for k in index["weight_map"])
    assert set(index["weight_map"].values()) == {p.name for p in folder.glob("model-*.safetensors")}
    assert not (out / MAP_FILE).exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = _hidden(AutoModel.from_pretrained(out).eval(), minilm_inputs)
    for g, p, w in zip(got, plain, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_dequantize_to_gives_the_dequantized_model(
    smol_nf4: Path, tmp_path: Path, smol_ids: torch.Tensor, nf4_reference: tuple[torch.Tensor, str]
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "float"
    result = runner.invoke(app, ["reload", str(smol_nf4), "--dequantize-to", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).is_file(), name
    assert not (out / MAP_FILE).exists() and not list(tmp_path.glob(".*tmp*"))
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert not any(k.endswith("_scale") for k in f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(plain, smol_ids), nf4_reference[0], rtol=0, atol=0)
    again = runner.invoke(app, ["reload", str(smol_nf4), "--dequantize-to", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


# -- bad input: one line, exit code 2 ---------------------------------------------------------------------
def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _cli_error(*args: str) -> str:
    result = runner.invoke(app, ["reload", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_missing_folder(tmp_path: Path) -> None:
    assert "no such folder" in _cli_error(str(tmp_path / "nope"))


def test_plain_model_folder_is_not_a_quanta_folder() -> None:
    assert "not a quanta folder" in _cli_error(str(minilm_dir()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 99}, "format_version 99"),
        ({"format": "other"}, "format 'other'"),
        ({"tensors": {"encoder.layer.0.attention.self.query.weight": {"scheme": "nf5", "block_size": 64,
                      "shape": [384, 384], "dtype": "float32"}}}, "unknown scheme 'nf5'"),
    ],
)  # fmt: skip
def test_bad_map_is_refused(minilm_nf4: Path, tmp_path: Path, change: dict, message: str) -> None:
    folder = _copy(minilm_nf4, tmp_path / "q")
    qmap = json.loads((folder / MAP_FILE).read_text())
    qmap.update(change)
    (folder / MAP_FILE).write_text(json.dumps(qmap))
    assert message in _cli_error(str(folder), "--device", "cpu")


@pytest.mark.slow
def test_truncated_shard_is_named(minilm_nf4: Path, tmp_path: Path) -> None:
    folder = _copy(minilm_nf4, tmp_path / "q")
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    line = _cli_error(str(folder), "--device", "cpu")
    assert "corrupt or truncated shard" in line and "model.safetensors" in line
    out = tmp_path / "float"
    with pytest.raises(QuantaError, match="corrupt or truncated"):
        dequantize_folder(folder, out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["q"]  # nothing half-written


@pytest.mark.slow
def test_missing_tensor_is_named(minilm_nf4: Path, tmp_path: Path) -> None:
    folder = _copy(minilm_nf4, tmp_path / "q")
    shard = folder / "model.safetensors"
    victim = "encoder.layer.2.intermediate.dense.weight_scale"
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != victim}
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _cli_error(str(folder), "--device", "cpu")
    assert f"missing tensor {victim}" in line
    with pytest.raises(QuantaError, match="missing tensor encoder.layer.2.intermediate.dense.weight_scale"):
        load_quantized(folder)


@pytest.mark.slow
def test_prompt_needs_a_causal_lm(minilm_nf4: Path) -> None:
    assert "needs a causal LM" in _cli_error(str(minilm_nf4), "--prompt", "hi", "--device", "cpu")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu(minilm_nf4: Path) -> None:
    assert "CUDA is not available" in _cli_error(str(minilm_nf4), "--device", "cuda")


@pytest.mark.slow
def test_summary_of_minilm(minilm_nf4: Path) -> None:
    text = summarize(load_quantized(minilm_nf4))
    assert text.startswith("BertModel on cpu: 36 QuantLinear (36 nf4)")


def test_hessian_method_folder_reloads(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A folder whose NVFP4 scales were searched with calibration statistics reloads as stored."""
    source = minilm_dir()
    calib = CalibrationInput(file=_calibration_file(tmp_path_factory, source))
    folder = _converted(tmp_path_factory, source, scheme="nvfp4", method="hessian", calibration=calib)
    entries = read_map(folder)["tensors"]
    name = "encoder.layer.0.attention.self.query.weight"
    assert entries[name]["method"] == "hessian"
    model = load_quantized(folder)
    module = model.get_submodule(name.removesuffix(".weight"))
    stored = {k: _stored(folder, name + s) for k, s in (("qdata", ""), ("scale", "_scale"), ("gs", "_global_scale"))}
    assert torch.equal(module.weight, stored["qdata"])
    assert torch.equal(module.weight_scale.view(torch.uint8), stored["scale"].view(torch.uint8))
    # The searched scales differ from plain NVFP4's somewhere (the method did something).
    plain = quantize(_stored(source, name).float(), "nvfp4")
    assert not torch.equal(plain.scale.view(torch.uint8), stored["scale"].view(torch.uint8))


def test_fp8_activations_on_a_reloaded_model(
    tmp_path_factory: pytest.TempPathFactory, minilm_inputs: dict[str, torch.Tensor]
) -> None:
    """An fp8 MiniLM folder: ``quanta reload --fp8-activations`` is accepted, and inside
    ``fp8_activations()`` the reloaded model's hidden states move against weight-only fp8 by the order of
    E4M3's rounding of the activations (at most 2**-4 relative per element; 5.1 % measured after six
    layers), and no more than twice that."""
    from quantize_cli.nn import fp8_activations

    folder = _converted(tmp_path_factory, minilm_dir(), scheme="fp8")
    result = runner.invoke(app, ["reload", str(folder), "--device", "cpu", "--fp8-activations"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "QuantLinear" in result.output
    nf4 = _converted(tmp_path_factory, minilm_dir(), scheme="nf4")
    assert "has no fp8 weights" in _cli_error(str(nf4), "--fp8-activations")
    model = load_quantized(folder)
    plain = _hidden(model, minilm_inputs)[0]
    with fp8_activations():
        rounded = _hidden(model, minilm_inputs)[0]
    moved = ((rounded - plain).norm() / plain.norm()).item()
    assert 1e-3 < moved < 2 * 2.0**-4, moved
    torch.testing.assert_close(_hidden(model, minilm_inputs)[0], plain)  # weight-only again after the block
