"""Perplexity of int8-static (W8A8) with and without SmoothQuant smoothing, through the product's own path.

A configuration is ``observer:smooth:samples`` (e.g. ``histogram:auto:128``, ``minmax:off:32``): ``quanta
calibrate`` with that observer, ``--smooth`` and ``samples`` windows of ``--seq-len`` tokens of the calibration
text, then ``quanta convert --scheme int8-static --calibration FILE --smooth ...``, then ``quanta eval --ppl``
on the evaluation text (``--eval-windows`` windows of ``--seq-len`` tokens, as in benchmarks/results.md).
Calibration files are cached in ``--work`` by their settings; ``off`` reuses a smoothed file of the same
observer and samples (its raw ranges are the same).

    python benchmarks/smoothquant_ppl.py --calib-text CAL.txt --eval-text EVAL.txt \\
        --configs histogram:auto:128 histogram:off:128 [--model DIR] [--work /tmp/sq]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quantize_cli.algorithms import parse_smooth
from quantize_cli.calibration import CalibrationSettings, calibrate
from quantize_cli.eval import evaluate
from quantize_cli.pipeline import convert
from quantize_cli.pipeline.convert import CalibrationInput


def calibration_file(model: str, text: str, work: Path, observer: str, smooth: str, samples: int, seq_len: int) -> Path:
    """The cached statistics for these settings, calibrating first if there are none."""
    name = f"calib-{observer}-{smooth}-{samples}x{seq_len}.safetensors"
    if smooth == "off":
        reusable = sorted(work.glob(f"calib-{observer}-*-{samples}x{seq_len}.safetensors"))
        if reusable:
            return reusable[0]
    path = work / name
    if not path.exists():
        settings = CalibrationSettings(observer=observer, hessian=False, device="cpu", smooth=parse_smooth(smooth))
        t0 = time.perf_counter()
        calibrate(model, text, path, samples, seq_len, settings, show_progress=False)
        print(f"calibrated {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def run(model: str, args: argparse.Namespace, config: str) -> dict:
    """Calibrate (cached), convert and evaluate one ``observer:smooth:samples`` configuration."""
    observer, smooth, samples = config.split(":")
    stats = calibration_file(model, args.calib_text, args.work, observer, smooth, int(samples), args.seq_len)
    out = args.work / f"int8s-{config.replace(':', '-')}"
    given = CalibrationInput(str(stats), smooth=smooth)
    convert(model, "int8-static", out=out, overwrite=True, device="cpu", progress=False, calibration=given)
    report = evaluate(str(out), ppl=True, data=args.eval_text, seq_len=args.seq_len, max_samples=args.eval_windows,
                      device="cpu")  # fmt: skip
    qmap = json.loads((out / "quantization_map.json").read_text())
    alphas = [g["alpha"] for g in qmap.get("smoothing", {}).get("groups", [])]
    return {"config": config, "ppl": report.ppl.ppl, "tokens": report.ppl.tokens, "alphas": alphas}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the test suite's SmolLM2-135M-Instruct)")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--configs", nargs="+", default=["histogram:auto:128", "histogram:off:128"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--work", type=Path, default=Path("/tmp/quanta-smoothquant"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from _models import smollm2_dir  # noqa: PLC0415

        args.model = str(smollm2_dir())
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs:
        row = run(args.model, args, config)
        rows.append(row)
        alphas = row["alphas"]
        mean = f"{sum(alphas) / len(alphas):.2f} over {len(alphas)} groups" if alphas else "-"
        print(f"| {config} | {row['ppl']:.3f} | {mean} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
