"""`quanta convert` / `quanta inspect` on the two real test models.

The reference for every converted folder is the in-memory route: load the whole state dict with
``safetensors.torch.load_file``, ``quantize`` each planned tensor, save each shard with
``safetensors.torch.save_file``. The streamed folder must equal it byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import minilm_dir, smollm2_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quantize_cli import SCHEMES, dequantize, quantize
from quantize_cli.cli import app
from quantize_cli.format import MAP_FILE, state_to_tensors, tensors_to_state
from quantize_cli.pipeline import convert, inspect_folder

runner = CliRunner()
WEIGHT_ONLY = [name for name, s in SCHEMES.items() if not s.needs_calibration]  # the others need `quanta calibrate`
ENTRY_KEYS = {"scheme", "block_size", "method", "shape", "dtype"}
SMOL_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
BERT_LINEAR = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense")  # fmt: skip


def smol_linear_names() -> set[str]:
    """SmolLM2's block Linear weights, written out from the Llama architecture (30 layers x 7)."""
    return {f"model.layers.{i}.{m}.weight" for i in range(30) for m in SMOL_LINEAR}


def bert_linear_names() -> set[str]:
    """MiniLM's block Linear weights (6 layers x 6); the pooler is a Linear outside the blocks."""
    return {f"encoder.layer.{i}.{m}.weight" for i in range(6) for m in BERT_LINEAR}


def read_map(out: Path) -> dict[str, Any]:
    return json.loads((out / MAP_FILE).read_text())


def weight_map(out: Path) -> dict[str, str]:
    """Stored tensor name -> shard file, from the index or the single file."""
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        return {k: "model.safetensors" for k in fh.keys()}


def assert_same_shards(out: Path, ref: Path) -> None:
    for f in sorted(ref.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f"{f.name} differs from the in-memory route"


@pytest.fixture(scope="module")
def minilm_by_scheme(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MiniLM converted with every registered scheme (small shards, so several files each)."""
    root = tmp_path_factory.mktemp("minilm")
    return {
        s: convert(str(minilm_dir()), scheme=s, out=root / s, max_shard_size="30MB", progress=False).out
        for s in WEIGHT_ONLY
    }


@pytest.fixture(scope="module")
def minilm_state() -> dict[str, torch.Tensor]:
    return load_file(minilm_dir() / "model.safetensors")


@pytest.fixture(scope="module")
def smol_nf4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "nf4"
    return convert(str(smollm2_dir()), scheme="nf4", out=out, max_shard_size="40MB", progress=False).out


def in_memory_reference(source_file: Path, out: Path, ref: Path) -> dict[str, Any]:
    """Write the folder's shards again the simple way: whole state dict in memory, ``save_file`` per shard.

    Returns ``quantize(W)`` of every tensor the map names, for further checks.
    """
    state = load_file(source_file)
    entries = read_map(out)["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    states = {}
    for name, w in state.items():
        entry = entries.get(name)
        if entry is None:
            tensors[name] = w
            continue
        options = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        if entry["method"] != "naive":  # a scale search is the scheme's `method` option
            options["method"] = entry["method"]
        states[name] = quantize(w, entry["scheme"], entry["block_size"], **options)
        tensors.update(state_to_tensors(name, states[name]))
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, file in weight_map(out).items():
        files.setdefault(file, {})[name] = tensors.pop(name)
    assert not tensors, f"tensors missing from the output: {sorted(tensors)[:3]}"
    ref.mkdir()
    for file, shard in files.items():
        save_file(shard, ref / file, metadata={"format": "pt"})
    return states


@pytest.mark.parametrize("scheme", WEIGHT_ONLY)
def test_minilm_every_scheme(
    scheme: str, minilm_by_scheme: dict[str, Path], minilm_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Streamed folder == in-memory route byte for byte; each tensor rebuilt from the map equals quantize(W)."""
    out = minilm_by_scheme[scheme]
    entries = read_map(out)["tensors"]
    assert set(entries) == bert_linear_names()
    states = in_memory_reference(minilm_dir() / "model.safetensors", out, tmp_path / "ref")
    assert_same_shards(out, tmp_path / "ref")
    source = minilm_state
    stored: dict[str, torch.Tensor] = {}
    for file in set(weight_map(out).values()):
        stored.update(load_file(out / file))
    for name, entry in entries.items():
        assert entry["scheme"] == SCHEMES[scheme].name and entry["method"] == "naive"
        assert entry["shape"] == list(source[name].shape) and entry["dtype"] == "float32"
        got = dequantize(tensors_to_state(name, entry, stored.get))
        assert got.dtype == source[name].dtype and got.shape == source[name].shape
        assert torch.equal(got, dequantize(states[name])), name
    for name in set(source) - set(entries):
        assert torch.equal(stored[name], source[name]), name


def test_smollm2_nf4_equals_in_memory_route(smol_nf4: Path, tmp_path: Path) -> None:
    in_memory_reference(smollm2_dir() / "model.safetensors", smol_nf4, tmp_path / "ref")
    assert_same_shards(smol_nf4, tmp_path / "ref")


def test_smollm2_folder_layout(smol_nf4: Path) -> None:
    src = smollm2_dir()
    files = sorted(p.name for p in smol_nf4.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                      "model-00003-of-00003.safetensors"]  # fmt: skip
    for f in shards:  # the budget counts tensor bytes; only a lone tensor larger than it may exceed it
        with safe_open(smol_nf4 / f, framework="pt") as fh:
            alone = len(fh.keys()) == 1
        assert alone or (smol_nf4 / f).stat().st_size - _header_bytes(smol_nf4 / f) <= 40e6, f
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (smol_nf4 / f).read_bytes() == (src / f).read_bytes(), f
    assert not [f for f in files if f.startswith(".")]
    index = json.loads((smol_nf4 / "model.safetensors.index.json").read_text())
    stored = weight_map(smol_nf4)
    with safe_open(src / "model.safetensors", framework="pt") as fh:
        source_names = set(fh.keys())
    assert "lm_head.weight" not in source_names and "lm_head.weight" not in stored  # tied: nothing to write
    suffixes = {n[len(b) :] for n in stored for b in smol_linear_names() if n.startswith(b)}
    assert suffixes == {"", "_scale"}
    assert set(stored) == source_names | {n + "_scale" for n in smol_linear_names()}
    total = 0
    for f in shards:
        with safe_open(smol_nf4 / f, framework="pt") as fh:
            for k in fh.keys():
                t = fh.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"BF16": 2, "F32": 4, "U8": 1}[t.get_dtype()]
    assert index["metadata"]["total_size"] == total


def test_smollm2_map_and_config(smol_nf4: Path) -> None:
    qmap = read_map(smol_nf4)
    assert qmap["format"] == "quanta" and qmap["format_version"] == 1 and qmap["quanta_version"]
    assert qmap["source"]["model"] == str(smollm2_dir()) and qmap["source"]["revision"] is None
    assert qmap["recipe"]["scheme"] == "nf4" and qmap["recipe"]["targets"] == "linear"
    assert set(qmap["tensors"]) == smol_linear_names()
    entry = qmap["tensors"]["model.layers.3.mlp.down_proj.weight"]
    assert entry == {"scheme": "nf4", "block_size": 64, "method": "naive", "shape": [576, 1536], "dtype": "bfloat16"}
    config = json.loads((smol_nf4 / "config.json").read_text())
    source_config = json.loads((smollm2_dir() / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == source_config
    assert qc["quant_method"] == "quanta" and qc["format_version"] == 1 and qc["map"] == MAP_FILE


def test_output_config_loads_with_transformers(smol_nf4: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smol_nf4)
    assert config.quantization_config["quant_method"] == "quanta"
    assert config.num_hidden_layers == 30


def test_embeddings_and_norms_keep_dtype(smol_nf4: Path) -> None:
    stored: dict[str, torch.Tensor] = {}
    for file in set(weight_map(smol_nf4).values()):
        stored.update(load_file(smol_nf4 / file))
    source = load_file(smollm2_dir() / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.7.input_layernorm.weight"):
        assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], source[name])
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8


def test_inspect_library(smol_nf4: Path) -> None:
    report = inspect_folder(smol_nf4)
    nf4 = next(g for g in report.groups if g.label == "nf4")
    # q, k, v, o, gate, up, down of one layer (out x in), 30 layers.
    per_layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    assert nf4.tensors == 210 and nf4.params == 30 * sum(o * i for o, i in per_layer) == 106_168_320
    assert nf4.bits_per_weight == pytest.approx(4.5)  # 4-bit codes + fp32 absmax per 64
    kept = next(g for g in report.groups if g.kept)
    assert kept.label.startswith("BF16") and kept.tensors == 272 - 210
    assert report.source["model"] == str(smollm2_dir())
    assert report.source_bytes == (smollm2_dir() / "model.safetensors").stat().st_size - _header_bytes(
        smollm2_dir() / "model.safetensors"
    )
    assert report.ratio == pytest.approx(report.bytes / report.source_bytes)
    assert 0.40 < report.ratio < 0.45  # embeddings (bf16) are 21% of SmolLM2's parameters
    assert report.recipe["scheme"] == "nf4"


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def test_inspect_cli(smol_nf4: Path) -> None:
    result = runner.invoke(app, ["inspect", str(smol_nf4)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"│ nf4\s+│\s+210 │\s+106,168,320 │ .* │\s+4\.5 │\s+64 │", result.output)
    assert str(smollm2_dir()) in result.output and "source" in result.output
    assert "BF16 (kept)" in result.output


def test_inspect_refuses_a_plain_model_folder() -> None:
    result = runner.invoke(app, ["inspect", str(smollm2_dir())])
    assert result.exit_code == 2
    assert "quantization_map.json" in result.stderr and "Traceback" not in result.output


def test_cli_convert_default_out_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["convert", str(minilm_dir()), "--scheme", "int8_linear"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = tmp_path / f"{minilm_dir().name}-int8"
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert "8.500 quantized" in result.stdout and "90.9 MB ->" in result.stdout
    assert "36 of 104 tensors" in result.stdout
    assert read_map(out)["recipe"]["scheme"] == "int8"


def test_bare_safetensors_file_uses_names(tmp_path: Path) -> None:
    """Without config.json the plan falls back to names: 2-D *.weight not embeddings/norms (pooler included)."""
    out = convert(str(minilm_dir() / "model.safetensors"), scheme="nf4", out=tmp_path / "o", progress=False).out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", MAP_FILE]
    assert set(read_map(out)["tensors"]) == bert_linear_names() | {"pooler.dense.weight"}
    in_memory_reference(minilm_dir() / "model.safetensors", out, tmp_path / "ref")
    assert_same_shards(out, tmp_path / "ref")


def _fake_hub_cache(cache: Path, repo: str, commit: str, files: Path) -> Path:
    """The layout huggingface_hub's snapshot_download reads offline: refs/main -> snapshots/<commit>/."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for f in files.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (snap / f.name).symlink_to(f)
    return snap


def test_hub_id_from_offline_cache(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "quanta-test/minilm", commit, minilm_dir())
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "quantize_cli", "convert", "quanta-test/minilm", "--scheme", "fp8", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "minilm-fp8"
    qmap = read_map(out)
    assert qmap["source"] == {**qmap["source"], "model": "quanta-test/minilm", "revision": commit}
    assert set(qmap["tensors"]) == bert_linear_names()
    assert (out / "tokenizer.json").read_bytes() == (minilm_dir() / "tokenizer.json").read_bytes()
    in_memory_reference(minilm_dir() / "model.safetensors", out, tmp_path / "ref")
    assert_same_shards(out, tmp_path / "ref")
    # Same cache, a revision it does not hold: one line, exit 2.
    proc = subprocess.run([*cmd, "--revision", "v9"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "quanta-test/minilm" in proc.stderr


def test_scale_search_method_is_recorded(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: nf4\nrules:\n  - {match: '*.3.attention.self.query', scheme: nvfp4, method: sse}\n")
    out = convert(str(minilm_dir()), recipe=recipe, out=tmp_path / "o", progress=False).out
    entries = read_map(out)["tensors"]
    searched = {n for n, e in entries.items() if e["method"] == "sse"}
    assert searched == {"encoder.layer.3.attention.self.query.weight"}
    assert all(entries[n]["scheme"] == "nvfp4" and "method" not in set(entries[n]) - ENTRY_KEYS for n in searched)
    in_memory_reference(minilm_dir() / "model.safetensors", out, tmp_path / "ref")
    assert_same_shards(out, tmp_path / "ref")


def test_shards_respect_budget_and_index_is_complete(tmp_path: Path) -> None:
    out = convert(str(minilm_dir()), scheme="nf4", out=tmp_path / "o", max_shard_size="2MB", progress=False).out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    big = {"embeddings.word_embeddings.weight"}  # 46.9 MB: larger than the budget, so alone in its shard
    for f in shards:
        with safe_open(out / f, framework="pt") as fh:
            keys = set(fh.keys())
        assert keys == big or (out / f).stat().st_size - _header_bytes(out / f) <= 2_000_000, f
        assert {k for k, v in index["weight_map"].items() if v == f} == keys
    in_memory_reference(minilm_dir() / "model.safetensors", out, tmp_path / "ref")
    assert_same_shards(out, tmp_path / "ref")
