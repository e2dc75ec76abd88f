"""Scale-search benchmark: NVFP4/MXFP4 SSE and Hessian searches against plain quantize (DESIGN §5: a
searched NVFP4 scale within 3x of plain NVFP4).

Times (CUDA-graph replays, as ``quant_kernels.py``) on fp16 weights of the kernel benchmark's shapes:
plain quantize (NVFP4 with its per-tensor amax pass, as the "nvfp4" row of ``quant_kernels.py``), the SSE
search and the Hessian search (Hessian diagonal blocks given, as the pipeline passes them), each also
without NVFP4's amax pass; ``--sweep`` adds rows-per-program x warps of both kernels on the first
shape. Writes ``search.json`` and ``search.md`` into ``--out``.

    python benchmarks/search.py --out /tmp/bench            # on a CUDA GPU
    python benchmarks/search.py --out /tmp/bench --sweep
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from quant_kernels import SHAPES, graph_us  # benchmarks/quant_kernels.py

from quantize_cli.kernels import ops
from quantize_cli.kernels.triton import search

N_SETS = 4  # input sets rotated through (4 x 90 MB of fp16 weights exceed the L2)


def hessian_blocks(cols: int, block: int, device: torch.device) -> torch.Tensor:
    """(cols // block, block, block) diagonal blocks of a synthetic X^T X (only these reach the kernel)."""
    a = torch.randn(cols // block, 64, block, device=device) * torch.logspace(-1, 1, block, device=device)
    return a.transpose(1, 2) @ a / 64


def cases(x: torch.Tensor) -> list[tuple[str, str, object]]:
    """(format, variant, fn(x) -> outputs) for every measured call on weights shaped like ``x``."""
    dev = x.device
    gsf = ops.resolve("nvfp4_global_scale", "triton", dev)
    qn, sn = ops.resolve("quantize_nvfp4", "triton", dev), ops.resolve("search_nvfp4", "triton", dev)
    qm, sm = ops.resolve("quantize_mxfp4", "triton", dev), ops.resolve("search_mxfp4", "triton", dev)
    h16, h32 = hessian_blocks(x.shape[1], 16, dev), hessian_blocks(x.shape[1], 32, dev)
    gs = gsf(x)
    return [
        ("nvfp4", "plain", lambda x: qn(x, 16, gsf(x))),
        ("nvfp4", "sse", lambda x: sn(x, 16, gsf(x), None)),
        ("nvfp4", "hessian", lambda x: sn(x, 16, gsf(x), h16)),
        ("nvfp4", "plain (gs given)", lambda x: qn(x, 16, gs)),
        ("nvfp4", "sse (gs given)", lambda x: sn(x, 16, gs, None)),
        ("nvfp4", "hessian (gs given)", lambda x: sn(x, 16, gs, h16)),
        ("mxfp4", "plain", lambda x: qm(x, 32)),
        ("mxfp4", "sse", lambda x: sm(x, 32, None)),
        ("mxfp4", "hessian", lambda x: sm(x, 32, h32)),
    ]


def measure(shape: tuple[int, int], only: set[str] | None = None) -> list[dict]:
    torch.manual_seed(0)
    xs = [torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(N_SETS)]
    rows = []
    for fmt, variant, fn in cases(xs[0]):
        if only is not None and f"{fmt} {variant}" not in only:
            continue
        us = graph_us(lambda i, fn=fn: fn(xs[i]), N_SETS)
        rows.append({"format": fmt, "variant": variant, "shape": "x".join(map(str, shape)), "us": us})
        print(f"{fmt:6s} {variant:20s} {rows[-1]['shape']:>11s} {us:9.1f} us", flush=True)
    return rows


def sweep(shape: tuple[int, int]) -> list[dict]:
    """Rows per program x warps of the SSE and the Hessian kernels, on one shape."""
    out = []
    defaults = (search.SEARCH_ROWS, search.SEARCH_WARPS, search.HESSIAN_ROWS, search.HESSIAN_WARPS)
    sse = {"nvfp4 sse (gs given)", "mxfp4 sse"}
    hess = {"nvfp4 hessian (gs given)", "mxfp4 hessian"}
    for kernel, rows, warps in [("sse", 256, 4), ("sse", 256, 8), ("sse", 64, 2), ("hessian", 128, 8)]:
        if kernel == "sse":
            search.SEARCH_ROWS, search.SEARCH_WARPS = rows, warps
        else:
            search.HESSIAN_ROWS, search.HESSIAN_WARPS = rows, warps
        print(f"{kernel}: rows {rows} warps {warps}", flush=True)
        out += [r | {"rows": rows, "warps": warps} for r in measure(shape, sse if kernel == "sse" else hess)]
        search.SEARCH_ROWS, search.SEARCH_WARPS, search.HESSIAN_ROWS, search.HESSIAN_WARPS = defaults
    return out


def markdown(res: dict) -> str:
    by = {(r["format"], r["variant"], r["shape"]): r["us"] for r in res["rows"]}
    out = [
        f"Device: {res['device']}; {res['date']}; torch {res['torch']}, Triton {res['triton']}.",
        f"Command: `{res['command']}`. fp16 weights; µs per call from CUDA-graph replays over {N_SETS} input",
        "copies (device time, no L2 reuse). Ratio = search / plain quantize of the same format (target for NVFP4:",
        '<= 3x). NVFP4 rows include the per-tensor amax pass; "gs given" rows are the block kernels alone.',
        "",
        "| format | shape | plain µs | SSE µs | SSE ratio | Hessian µs | Hessian ratio"
        " | kernels alone: plain / SSE / Hessian µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fmt in ("nvfp4", "mxfp4"):
        for shape in dict.fromkeys(r["shape"] for r in res["rows"]):
            plain, sse, hess = (by.get((fmt, v, shape)) for v in ("plain", "sse", "hessian"))
            if plain is None:
                continue
            alone = [by.get((fmt, f"{v} (gs given)", shape)) for v in ("plain", "sse", "hessian")]
            alone_s = " / ".join(f"{v:.1f}" for v in alone) if all(alone) else "-"
            out.append(
                f"| {fmt} | {shape} | {plain:.1f} | {sse:.1f} | {sse / plain:.2f} | {hess:.1f} | {hess / plain:.2f}"
                f" | {alone_s} |"
            )
    if res.get("sweep"):
        out += ["", "Sweep (first shape): rows per program x warps.", ""]
        out += ["| rows | warps | case | µs |", "|---|---|---|---|"]
        for r in res["sweep"]:
            case = f"{r['format']} {r['variant']}"
            out.append(f"| {r['rows']} | {r['warps']} | {case} | {r['us']:.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for search.json and .md")
    parser.add_argument("--sweep", action="store_true", help="also sweep rows per program and warps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for shape in SHAPES for r in measure(shape)]
    res = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "rows": rows,
        "sweep": sweep(SHAPES[0]) if args.sweep else [],
    }
    (args.out / "search.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "search.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
