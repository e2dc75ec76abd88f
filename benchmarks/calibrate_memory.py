"""Peak resident memory of `quanta calibrate` on the synthetic Llama-3.2-3B-shaped checkpoint.

Writes the same ~6.4 GB bf16 checkpoint as convert_memory.py, adds a tokenizer (copied from
--tokenizer, default the test suite's SmolLM2; its ids fit the 128k vocabulary), then runs
`quanta calibrate` with 32 samples x 512 tokens of --text in a child process and reports its peak RSS
and wall time. Target: under 4 GB on CPU.

    python benchmarks/calibrate_memory.py --text FILE [--tokenizer DIR] [--samples 32 --seq-len 512]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory import measure, write_checkpoint  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def default_tokenizer() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _models import smollm2_dir  # noqa: PLC0415

    return smollm2_dir()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", required=True, help="calibration text (a local .txt)")
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--hessian", action="store_true", help="also collect X^T X (off: ranges only)")
    p.add_argument("--smooth", default="auto", help="quanta calibrate --smooth (auto: calibrate's default)")
    p.add_argument("--timeout", type=float, default=3000)
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--layers",
        type=int,
        default=28,
        help="decoder layers to write (the peak holds one layer: fewer is a fast proxy)",
    )
    args = p.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="quanta-calib-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "llama-3b-synthetic"
    if args.write_only:
        gb = write_checkpoint(ckpt, args.layers) / 1e9
        print(f"wrote {gb:.2f} GB checkpoint to {ckpt}")
        return 0
    if not (ckpt / "model.safetensors.index.json").is_file():
        # In a child: the measured command must not start as a fork of a process that held the weights
        # (ru_maxrss keeps the pre-exec peak of a forked child).
        subprocess.run(
            [sys.executable, __file__, "--write-only", "--dir", str(work), "--text", args.text, "--layers",
             str(args.layers)],
            check=True,
        )  # fmt: skip
    tok = args.tokenizer or default_tokenizer()
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy(tok / name, ckpt / name)
    out = work / "calib.safetensors"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "quantize_cli", "calibrate", str(ckpt), "--data", args.text, "--samples",
           str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out), "--device", "cpu",
           "--hessian" if args.hessian else "--no-hessian", "--smooth", args.smooth]  # fmt: skip
    rss, wall, code = measure(cmd, args.timeout)
    size = out.stat().st_size / 1e9 if out.is_file() else float("nan")
    print(f"quanta calibrate ({args.layers} layers, {args.samples} x {args.seq_len}, hessian={args.hessian}, "
          f"smooth={args.smooth}): peak RSS {rss:.2f} GiB, "
          f"{wall:.0f} s, exit {code}, statistics {size:.2f} GB")  # fmt: skip
    return code


if __name__ == "__main__":
    raise SystemExit(main())
