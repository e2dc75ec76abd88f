"""Recipes: the shipped YAML files, validation errors, warnings, command-line overrides, the plan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _models import minilm_dir, smollm2_dir
from typer.testing import CliRunner

from quantize_cli import SCHEMES
from quantize_cli.cli import app
from quantize_cli.errors import QuantaError
from quantize_cli.pipeline import build_recipe, convert, load_recipe
from quantize_cli.pipeline.plan import Target, make_plan
from quantize_cli.pipeline.source import SourceReader, resolve_source

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
runner = CliRunner()
SMOL_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@pytest.fixture(scope="module")
def smol():
    return resolve_source(str(smollm2_dir()))


@pytest.fixture(scope="module")
def minilm():
    return resolve_source(str(minilm_dir()))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def targets(plan) -> dict[str, Target | None]:
    return {n: tp.target for n, tp in plan.tensors.items()}


def test_shipped_recipes_load() -> None:
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"nf4", "int8", "nvfp4", "mixed"} <= names
    for path in RECIPES.glob("*.yaml"):
        recipe = load_recipe(path)
        assert recipe.name == path.stem and recipe.scheme in SCHEMES


@pytest.mark.parametrize(
    ("name", "scheme", "block"), [("nf4", "nf4", 64), ("int8", "int8", 64), ("nvfp4", "nvfp4", 16)]
)
def test_single_scheme_recipes_plan(smol, name: str, scheme: str, block: int) -> None:
    plan = make_plan(smol, load_recipe(RECIPES / f"{name}.yaml"), 2 * 10**9)
    expected = {f"model.layers.{i}.{m}.weight" for i in range(30) for m in SMOL_LINEAR}
    got = targets(plan)
    assert {n for n, t in got.items() if t} == expected
    assert {got[n] for n in expected} == {Target(scheme, block)}
    assert plan.warnings == []


def test_mixed_recipe_plan_on_smollm2(smol) -> None:
    """Hand-written expectation per tensor class: layer 0 kept, down_proj int8, k/v int4 asym, rest nf4."""
    plan = make_plan(smol, load_recipe(RECIPES / "mixed.yaml"), 2 * 10**9)
    got = targets(plan)
    for i in range(30):
        for m in SMOL_LINEAR:
            t = got[f"model.layers.{i}.{m}.weight"]
            if i == 0:
                assert t is None
            elif m == "mlp.down_proj":
                assert t == Target("int8", 64)
            elif m in ("self_attn.k_proj", "self_attn.v_proj"):
                assert t == Target("int4", 64, (("symmetric", False),))
            else:
                assert t == Target("nf4", 64)
    assert got["model.embed_tokens.weight"] is None and got["model.norm.weight"] is None
    assert sum(t is not None for t in got.values()) == 29 * 7
    assert plan.warnings == []


def test_mixed_recipe_converts_and_records_options(tmp_path: Path) -> None:
    """A real conversion: the map carries each tensor's scheme, block and options (symmetric: false)."""
    out = convert(str(minilm_dir()), recipe=RECIPES / "mixed.yaml", out=tmp_path / "o", progress=False).out
    # MiniLM has no layers.0 / down_proj / self_attn: every pattern misses, everything falls to nf4.
    entries = json.loads((out / "quantization_map.json").read_text())["tensors"]
    assert {e["scheme"] for e in entries.values()} == {"nf4"} and len(entries) == 36
    text = "scheme: nf4\nrules:\n  - {match: '*.attention.self.key', scheme: int4, symmetric: false}\n"
    recipe = load_recipe(write(tmp_path, text))
    out = convert(str(minilm_dir()), recipe=tmp_path / "r.yaml", out=tmp_path / "p", progress=False).out
    entries = json.loads((out / "quantization_map.json").read_text())["tensors"]
    key = entries["encoder.layer.2.attention.self.key.weight"]
    assert key == {"scheme": "int4", "block_size": 128, "method": "naive", "shape": [384, 384], "dtype": "float32",
                   "symmetric": False}  # fmt: skip
    assert entries["encoder.layer.2.attention.self.query.weight"]["scheme"] == "nf4"
    assert recipe.rules[0].options == {"symmetric": False}


def test_rule_matching_nothing_warns(minilm, tmp_path: Path) -> None:
    plan = make_plan(minilm, load_recipe(RECIPES / "mixed.yaml"), 2 * 10**9)
    assert len(plan.warnings) == 3  # the ignore pattern and both rules are Llama-named
    assert all("matches no" in w for w in plan.warnings)
    assert any("*.mlp.down_proj" in w for w in plan.warnings)


def test_rule_warning_reaches_cli_stderr(tmp_path: Path) -> None:
    text = (
        "scheme: nf4\nrules:\n- {match: '*.no_such_module', scheme: int8}\n- {match: 're:.*[xy]_proj', scheme: fp8}\n"
    )
    recipe = write(tmp_path, text)
    args = ["convert", str(minilm_dir()), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("warning:") for line in lines)
    assert "'*.no_such_module'" in lines[0] and "'re:.*[xy]_proj'" in lines[1]  # brackets survive rich markup


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scheme: nf4\nblocksize: 64\n", "unknown key 'blocksize'"),
        ("scheme: nf5\n", "unknown scheme 'nf5'"),
        ("scheme: nf4\nrules:\n  - {match: '*', scheme: int8, group: 3}\n", "rule 1: unknown key 'group'"),
        ("scheme: nf4\nrules:\n  - {match: '*.q_proj', scheme: fp5}\n", "rule 1: unknown scheme 'fp5'"),
        ("scheme: nf4\nrules:\n  - {match: '*', scheme: nf4, block_size: 63}\n", "rule 1: block_size must be even"),
        ("scheme: nf4\nblock_size: 0\n", "block_size must be a positive integer"),
        ("scheme: nf4\nrules:\n  - {scheme: int8}\n", "rule 1: missing or empty 'match'"),
        ("scheme: nf4\nrules:\n  - {match: 're:(', scheme: int8}\n", "invalid regex"),
        ("scheme: nf4\ntargets: everything\n", "targets must be one of linear, all-2d"),
        ("scheme: nf4\nsymmetric: false\n", "unknown key 'symmetric' for scheme nf4"),
        ("scheme: none\n", "quantizes nothing"),
        ("- nf4\n", "must be a YAML mapping"),
        ("scheme: [nf4\n", "invalid YAML"),
    ],
)
def test_recipe_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(QuantaError, match=re.escape(message)):
        load_recipe(path)
    if "unknown scheme" in message:  # the valid names are listed
        with pytest.raises(QuantaError, match="int8_linear"):
            load_recipe(path)


def test_recipe_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, "scheme: nf4\nrules:\n  - {match: '*', scheme: int8, group: 3}\n")
    result = runner.invoke(app, ["convert", str(minilm_dir()), "--recipe", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "group" in result.stderr
    assert not (tmp_path / "o").exists()


def test_literal_rule_on_a_1d_tensor_fails_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reads(self, name):  # the plan must be refused from headers alone
        raise AssertionError(f"tensor {name} was read before the plan was validated")

    monkeypatch.setattr(SourceReader, "get", no_reads)
    path = write(tmp_path, "scheme: nf4\nrules:\n  - {match: model.norm, scheme: int8}\n")
    with pytest.raises(QuantaError, match=r"rule 1 .*model\.norm\.weight.*1-D.*only 2-D"):
        convert(str(smollm2_dir()), recipe=path, out=tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == [path]  # no output folder, no staging folder


def test_glob_rules_skip_1d_tensors(minilm) -> None:
    """A glob that also hits biases and LayerNorms quantizes only the 2-D weights it matches."""
    recipe = load_recipe_text("scheme: nf4\nrules:\n  - {match: 'encoder.layer.1.*', scheme: int8}\n")
    plan = make_plan(minilm, recipe, 2 * 10**9)
    got = targets(plan)
    assert got["encoder.layer.1.output.LayerNorm.weight"] is None and got["encoder.layer.1.output.dense.bias"] is None
    assert got["encoder.layer.1.output.dense.weight"] == Target("int8", 64)
    assert got["encoder.layer.2.output.dense.weight"] == Target("nf4", 64)


def load_recipe_text(text: str):
    import yaml

    from quantize_cli.pipeline.recipe import recipe_from_dict

    return recipe_from_dict(yaml.safe_load(text), "inline")


def test_rules_reach_beyond_targets_and_all_2d(minilm, smol) -> None:
    recipe = load_recipe_text("scheme: nf4\nrules:\n  - {match: pooler.dense, scheme: int8, block_size: 128}\n")
    assert targets(make_plan(minilm, recipe, 2 * 10**9))["pooler.dense.weight"] == Target("int8", 128)
    plan = make_plan(smol, load_recipe_text("scheme: nf4\ntargets: all-2d\n"), 2 * 10**9)
    assert targets(plan)["model.embed_tokens.weight"] == Target("nf4", 64)
    assert len(plan.quantized) == 211


def test_ignore_wins_and_scheme_none_keeps(smol) -> None:
    text = (
        "scheme: nf4\nignore: ['*.o_proj']\nrules:\n  - {match: '*.o_proj', scheme: int8}\n"
        "  - {match: 're:.*\\.layers\\.(1|2)\\.mlp\\..*', scheme: none}\n"
    )
    got = targets(make_plan(smol, load_recipe_text(text), 2 * 10**9))
    assert got["model.layers.5.self_attn.o_proj.weight"] is None
    assert got["model.layers.1.mlp.up_proj.weight"] is None and got["model.layers.12.mlp.up_proj.weight"] is not None
    assert got["model.layers.1.self_attn.q_proj.weight"] == Target("nf4", 64)


def test_command_line_overrides_recipe(tmp_path: Path) -> None:
    r = build_recipe(RECIPES / "mixed.yaml", scheme="int8_linear", block_size=128, ignore=["*.q_proj"])
    assert r.scheme == "int8" and r.block_size == 128 and r.name == "mixed"
    assert [p.text for p in r.ignore] == ["re:.*\\.layers\\.0\\..*", "*.q_proj"]
    assert len(r.rules) == 2  # rules are kept
    plain = build_recipe(scheme="fp8", ignore=["*.k_proj"])
    assert plain.name == "fp8" and plain.scheme == "fp8" and [p.text for p in plain.ignore] == ["*.k_proj"]
    assert build_recipe().scheme == "nf4"
    int4 = write(tmp_path, "scheme: int4\nsymmetric: false\n")
    assert build_recipe(int4, scheme="int4").options == {"symmetric": False}  # same scheme: options stay
    assert build_recipe(int4, scheme="nf4").options == {}  # another scheme: its defaults
    with pytest.raises(QuantaError, match="block_size must be even"):
        build_recipe(scheme="nf4", block_size=33)


def test_cli_ignore_flag(tmp_path: Path) -> None:
    args = ["convert", str(minilm_dir()), "--scheme", "fp8", "--ignore", "*.intermediate.dense", "--ignore",
            "re:encoder\\.layer\\.5\\..*", "--out", str(tmp_path / "o")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    entries = json.loads((tmp_path / "o" / "quantization_map.json").read_text())["tensors"]
    assert len(entries) == 5 * 5 and not any("intermediate" in n or ".layer.5." in n for n in entries)
