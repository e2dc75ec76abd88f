"""Weight and output error of NVFP4 / MXFP4 naive, SSE-optimal and Hessian-optimal scales on real weights.

For every decoder Linear of a model: weight error ||Q(W) - W|| / ||W|| and output error
||X Q(W)^T - X W^T|| / ||X W^T||, the latter computed exactly from the calibration statistics as
sqrt(tr(dW H dW^T) / tr(W H W^T)) with H = X^T X / tokens (the same quantity as the Qwantize seed's
output error, without materialising X). Reported as the mean over Linears and as relative improvements.

    python benchmarks/calibrated_methods.py --calib-text CAL.txt [--model DIR] [--samples 32 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from quantize_cli import dequantize, quantize
from quantize_cli.calibration import CalibrationSettings, CalibrationStats, calibrate
from quantize_cli.kernels import scale_search
from quantize_cli.pipeline.source import SourceReader, resolve_source

METHODS = ("naive", "sse", "hessian")


def errors(w: torch.Tensor, h: torch.Tensor, scheme: str, method: str) -> tuple[float, float]:
    """(weight error, output error) of quantizing ``w`` (out, in) with ``scheme`` / ``method``."""
    options = {"method": method}
    if method == "hessian":
        options["hessian"] = h
    dw = dequantize(quantize(w, scheme, **options)) - w
    weight = float(dw.norm() / w.norm())
    output = float(torch.sqrt(torch.einsum("ij,jk,ik->", dw, h, dw) / torch.einsum("ij,jk,ik->", w, h, w)))
    return weight, output


def measure(model: str, stats: CalibrationStats, schemes: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Per scheme and method: the list of (weight, output) errors over every calibrated Linear."""
    source = resolve_source(model)
    out: dict[str, dict[str, list]] = {s: {m: [] for m in METHODS} for s in schemes}
    with SourceReader(source) as reader:
        for linear in sorted(stats.linears):
            w = reader.get(f"{linear}.weight").float()
            h = stats.hessian(linear).float()
            for scheme in schemes:
                for method in METHODS:
                    out[scheme][method].append(errors(w, h, scheme, method))
    return out


def summarise(results: dict[str, dict[str, list]]) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for scheme, per_method in results.items():
        summary[scheme] = {}
        for method, pairs in per_method.items():
            t = torch.tensor(pairs, dtype=torch.float64)
            summary[scheme][method] = {
                "weight": float(t[:, 0].mean()),
                "output": float(t[:, 1].mean()),
                "n": len(pairs),
            }
    return summary


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        "| scheme | method | weight error | output error | weight vs naive | output vs naive |",
        "|---|---|---|---|---|---|",
    ]
    for scheme, per_method in summary.items():
        base = per_method["naive"]
        for method, v in per_method.items():
            dw = 1 - v["weight"] / base["weight"]
            do = 1 - v["output"] / base["output"]
            lines.append(
                f"| {scheme} | {method} | {100 * v['weight']:.2f} % | {100 * v['output']:.2f} % | "
                f"{-100 * dw:+.1f} % | {-100 * do:+.1f} % |"
            )
    head = (
        f"Model `{meta['model']}`, {meta['linears']} decoder Linears, calibration "
        f"{meta['samples']} x {meta['seq_len']} tokens of `{meta['calib_text']}`; "
        f"errors are means over the Linears. Command: `{meta['command']}`"
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def _steps(text: str) -> tuple[int, ...]:
    """``LO:HI`` (the E4M3 steps LO..HI-1) or ``S1,S2,...`` (those steps) -> an ascending tuple (argparse
    type: a bad value is a one-line usage error)."""
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":"))
            steps = tuple(range(lo, hi))
        else:
            steps = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI or S1,S2,... with integers, got {text!r}") from None
    if not steps:
        raise argparse.ArgumentTypeError(f"no steps in {text!r}: LO must be below HI")
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the test suite's SmolLM2-135M-Instruct)")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--stats", default=None, help="reuse a calibration file")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--sse-steps", type=_steps, help="NVFP4 SSE candidate steps: LO:HI (E4M3 steps, HI excluded) or S1,S2,..."
    )
    p.add_argument("--hessian-steps", type=_steps, help="NVFP4 Hessian candidate steps, as --sse-steps")
    args = p.parse_args(argv)
    for steps, name in [(args.sse_steps, "NVFP4_STEPS"), (args.hessian_steps, "NVFP4_HESSIAN_STEPS")]:
        if steps:  # the reference search reads the module's step sets (what the defaults were chosen by)
            setattr(scale_search, name, steps)
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from _models import smollm2_dir  # noqa: PLC0415

        args.model = str(smollm2_dir())
    stats_path = Path(args.stats or "/tmp/quanta-bench-calib.safetensors")
    if args.stats is None:
        settings = CalibrationSettings(observer="minmax", hessian=True, device="cpu")
        calibrate(args.model, args.calib_text, stats_path, args.samples, args.seq_len, settings, overwrite=True)
    stats = CalibrationStats(stats_path)
    t0 = time.time()
    summary = summarise(measure(args.model, stats, ("nvfp4", "mxfp4")))
    meta = {
        "model": Path(args.model).name,
        "linears": len(stats.linears),
        "samples": stats.metadata.get("samples"),
        "seq_len": stats.metadata.get("seq_len"),
        "calib_text": Path(args.calib_text).name,
        "command": "python " + " ".join(sys.argv),
        "seconds": round(time.time() - t0, 1),
    }
    print(markdown(summary, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "meta": meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
