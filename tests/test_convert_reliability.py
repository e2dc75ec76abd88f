"""DESIGN §6 for `quanta convert`: staging + rename, resume after a kill, refusals, one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import minilm_dir
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quantize_cli import SCHEMES
from quantize_cli.cli import app
from quantize_cli.errors import QuantaError
from quantize_cli.pipeline import convert
from quantize_cli.pipeline.convert import PROGRESS_FILE

convert_mod = importlib.import_module("quantize_cli.pipeline.convert")  # the module, not the function
runner = CliRunner()
LINEAR = "encoder.layer.2.intermediate.dense.weight"


def cli(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".*"))
    return dest


def test_built_in_a_staging_folder_then_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    staging = tmp_path / ".o.quanta-tmp"
    seen = []
    real = convert_mod._convert_tensor

    def spy(*args):
        seen.append((out.exists(), staging.is_dir()))
        return real(*args)

    monkeypatch.setattr(convert_mod, "_convert_tensor", spy)
    convert(str(minilm_dir()), scheme="nf4", out=out, progress=False)
    assert seen and all(s == (False, True) for s in seen)  # only the staging folder exists while writing
    assert out.is_dir() and not staging.exists()
    assert not (out / PROGRESS_FILE).exists()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = convert_mod._convert_tensor

    def fail_on_tenth(tp, *rest):
        calls.append(tp.name)
        if len(calls) == 10:
            raise QuantaError("simulated failure")
        return real(tp, *rest)

    monkeypatch.setattr(convert_mod, "_convert_tensor", fail_on_tenth)
    with pytest.raises(QuantaError, match="simulated"):
        convert(str(minilm_dir()), scheme="nf4", out=tmp_path / "o", max_shard_size="2MB", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_resume_after_kill_is_byte_identical(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "quantize_cli", "convert", str(minilm_dir()), "--scheme", "nf4",
            "--max-shard-size", "2MB", "--device", "cpu", "--out", str(tmp_path / "resumed")]  # fmt: skip
    env = {**os.environ, "QUANTA_TEST_STOP_AFTER_SHARDS": "2"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging = tmp_path / ".resumed.quanta-tmp"
    progress = json.loads((staging / PROGRESS_FILE).read_text())
    assert sorted(progress["done"]) == ["model-00001-of-00006.safetensors", "model-00002-of-00006.safetensors"]
    assert not (tmp_path / "resumed").exists()
    first_shard = (staging / "model-00001-of-00006.safetensors").stat()

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 2 finished shard(s)" in resumed.stderr and "6 (2 resumed)" in resumed.stdout
    assert not staging.exists()
    kept = (tmp_path / "resumed" / "model-00001-of-00006.safetensors").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (first_shard.st_ino, first_shard.st_mtime_ns)  # not rewritten

    fresh = convert(str(minilm_dir()), scheme="nf4", max_shard_size="2MB", out=tmp_path / "fresh", progress=False)
    assert folder_bytes(fresh.out) == folder_bytes(tmp_path / "resumed")


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    staging = tmp_path / ".o.quanta-tmp"
    staging.mkdir()
    (staging / PROGRESS_FILE).write_text(json.dumps({"fingerprint": "other", "done": {}}))
    result = cli("convert", str(minilm_dir()), "--out", str(tmp_path / "o"), "--resume")
    assert_one_line_error(result, "cannot resume", "--resume")
    assert staging.is_dir()  # left for the user to decide
    result = cli("convert", str(minilm_dir()), "--out", str(tmp_path / "o"), "--scheme", "fp8")
    assert result.exit_code == 0 and "discarding an unfinished earlier run" in result.stderr
    assert not staging.exists() and (tmp_path / "o" / "quantization_map.json").is_file()


def test_existing_output_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("convert", str(minilm_dir()), "--out", str(out))
    assert_one_line_error(result, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = cli("convert", str(minilm_dir()), "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(minilm_dir() / "config.json", src / "config.json")
    torch.save(load_file(minilm_dir() / "model.safetensors"), src / "pytorch_model.bin")
    result = cli("convert", str(src), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "pickle", "--allow-pickle")
    result = cli("convert", str(src / "pytorch_model.bin"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "pickle")
    assert not (tmp_path / "o").exists()
    result = cli("convert", str(src), "--out", str(tmp_path / "o"), "--allow-pickle")
    assert result.exit_code == 0, result.output
    # Same tensors as the safetensors route, so the same bytes (safetensors orders a file by dtype and name).
    ref = convert(str(minilm_dir()), out=tmp_path / "ref", progress=False).out
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_names_the_tensor(tmp_path: Path, bad: float) -> None:
    src = copy_model(minilm_dir(), tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state[LINEAR][3, 5] = bad
    save_file(state, src / "model.safetensors")
    result = cli("convert", str(src), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, LINEAR, "NaN or Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_shard_names_the_file_and_writes_nothing(tmp_path: Path, damage: str) -> None:
    src = copy_model(minilm_dir(), tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    result = cli("convert", str(src), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, str(weights), "corrupt or truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    src = copy_model(minilm_dir(), tmp_path / "src")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    assert_one_line_error(cli("convert", str(src), "--out", str(tmp_path / "o")), "model-00002.safetensors", "missing")


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(cli("convert", str(tmp_path / "nope" / "model.safetensors")), "model not found")
    assert_one_line_error(cli("convert", str(tmp_path / "nope.safetensors")), "model not found")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "quantize_cli", "convert", "no-such-org/no-such-model"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model not found: no-such-org/no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*model*"))


def test_debug_env_shows_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    assert "Traceback" not in cli("convert", missing).output
    result = cli("convert", missing, env={"QUANTA_DEBUG": "1"})
    assert result.exit_code == 2 and "Traceback" in result.output and "QuantaError" in result.output


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    model = str(minilm_dir())
    assert_one_line_error(cli("convert", model, "--max-shard-size", "lots"), "invalid size 'lots'")
    assert_one_line_error(cli("convert", model, "--scheme", "nf5"), "unknown scheme 'nf5'", "int8_linear")
    assert_one_line_error(cli("convert", model, "--block-size", "63"), "even")
    assert_one_line_error(cli("convert", model, "--device", "tpu"), "unknown device")
    assert_one_line_error(cli("convert", model, "--recipe", str(tmp_path / "none.yaml")), "recipe not found")
    assert_one_line_error(cli("convert", model, "--revision", "main"), "hub ids only")
    if not torch.cuda.is_available():
        assert_one_line_error(cli("convert", model, "--device", "cuda"), "no CUDA device")
    for name in [n for n, s in SCHEMES.items() if s.needs_calibration][:1]:  # weight-only conversion only
        assert_one_line_error(cli("convert", model, "--scheme", name), f"({name}, method naive) needs calibration data")
    assert_one_line_error(
        cli("convert", model, "--scheme", "nvfp4", "--method", "hessian"), "(nvfp4, method hessian) needs calibration"
    )
    assert_one_line_error(cli("convert", model, "--scheme", "nvfp4", "--method", "best"), "unknown method 'best'")
    assert_one_line_error(cli("convert", model, "--scheme", "nf4", "--method", "sse"), "unknown key 'method'")
    missing = str(tmp_path / "nope.safetensors")
    assert_one_line_error(
        cli("convert", model, "--scheme", "int8-static", "--calibration", missing), "calibration file not found"
    )
    not_stats = tmp_path.parent / f"{tmp_path.name}-not-stats.safetensors"
    save_file({"x": torch.zeros(1)}, str(not_stats))
    assert_one_line_error(
        cli("convert", model, "--scheme", "int8-static", "--calibration", str(not_stats)), "not a quanta calibration"
    )
    assert not list(tmp_path.glob("*-int8-static")) and not list(Path.cwd().glob("*int8-static*"))
    assert list(tmp_path.iterdir()) == []


def test_already_quantized_source_refused(tmp_path: Path) -> None:
    out = convert(str(minilm_dir()), scheme="fp16", out=tmp_path / "q", progress=False).out
    assert_one_line_error(cli("convert", str(out), "--out", str(tmp_path / "again")), "already quantized", "quanta")
