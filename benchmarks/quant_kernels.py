"""Kernel benchmark: Triton quantize/dequantize against the memory floor, bitsandbytes and the eager reference.

For each weight shape, input dtype and scheme it times (median of ``triton.testing.do_bench``) the
kernel-level ops that ``quantize(..., backend=)`` dispatches to, and reports achieved GB/s and the
ratio to the floor: (bytes read + bytes written) / the device-to-device copy bandwidth measured in the
same run. NVFP4's quantize includes its per-tensor amax pass (a second read of the weight); the
"nvfp4 (gs given)" row times the block kernel alone. Writes ``kernels.json``, ``kernels.md`` and two
PNG plots into ``--out``.

    python benchmarks/quant_kernels.py --out /tmp/bench            # on a CUDA GPU
    python benchmarks/quant_kernels.py --schemes nf4,fp4 --merge benchmarks/kernels.json --out /tmp/bench
                                                             # a subset, merged into an earlier run
    python benchmarks/quant_kernels.py --sweep --out /tmp/bench    # tile size x warps, a few kernels
    TRITON_INTERPRET=1 python benchmarks/quant_kernels.py --smoke  # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantize_cli.kernels import ops
from quantize_cli.kernels.constants import FP4_CODEBOOK, NF4_CODEBOOK, codebook_tensor, nf8_codebook
from quantize_cli.kernels.timing import capture, replay_ms

Tensor = torch.Tensor
SHAPES = [(4096, 11008), (8192, 8192), (14336, 4096)]
SEED_SHAPE = (4096, 11008)


@dataclass
class Kernel:
    """One scheme at the kernel level: x -> parts (the stored tensors), parts -> x."""

    name: str
    block: int
    quantize: Callable[[Tensor], tuple[Tensor, ...]]
    dequantize: Callable[[tuple[Tensor, ...], torch.dtype], Tensor]


def kernels(backend: str, device: torch.device) -> list[Kernel]:
    """Every scheme at its default block size, through ``ops.resolve(op, backend, device)``."""

    def op(name: str) -> Callable:
        return ops.resolve(name, backend, device)

    qc, dc = op("quantize_codebook"), op("dequantize_codebook")
    qi, di = op("quantize_int"), op("dequantize_int")
    qf, df = op("quantize_fp8"), op("dequantize_fp8")
    gsf, qn, dn = op("nvfp4_global_scale"), op("quantize_nvfp4"), op("dequantize_nvfp4")
    qm, dm = op("quantize_mxfp4"), op("dequantize_mxfp4")
    books = {n: codebook_tensor(v, device) for n, v in [("nf4", NF4_CODEBOOK), ("fp4", FP4_CODEBOOK)]}
    books["nf8"] = codebook_tensor(nf8_codebook(), device)
    out: list[Kernel] = []
    for name, cb in books.items():
        pack = name != "nf8"
        out.append(
            Kernel(
                name,
                64,
                lambda x, cb=cb, pack=pack: qc(x, 64, cb, pack),
                lambda p, dt, cb=cb, pack=pack: dc(p[0], p[1], cb, 64, pack, dt),
            )
        )
    for name, bits, block, sym in [("int8", 8, 64, True), ("int4", 4, 128, True), ("int4-asym", 4, 128, False)]:
        out.append(
            Kernel(
                name,
                block,
                lambda x, b=bits, k=block, s=sym: tuple(t for t in qi(x, k, b, s) if t is not None),
                lambda p, dt, b=bits, k=block: di(p[0], p[1], p[2] if len(p) > 2 else None, k, b, dt),
            )
        )
    out.append(Kernel("fp8", 128, lambda x: qf(x, 128), lambda p, dt: df(p[0], p[1], 128, dt)))

    def nvfp4(x: Tensor) -> tuple[Tensor, ...]:
        gs = gsf(x)
        return (*qn(x, 16, gs), gs)

    out.append(Kernel("nvfp4", 16, nvfp4, lambda p, dt: dn(p[0], p[1], p[2], 16, dt)))
    out.append(Kernel("mxfp4", 32, lambda x: qm(x, 32), lambda p, dt: dm(p[0], p[1], 32, dt)))
    return out


def nvfp4_given_scale(x: Tensor, device: torch.device) -> Kernel:
    """NVFP4's block kernel alone, its global scale computed beforehand (not timed)."""
    gs = ops.resolve("nvfp4_global_scale", "triton", device)(x)
    qn, dn = ops.resolve("quantize_nvfp4", "triton", device), ops.resolve("dequantize_nvfp4", "triton", device)
    return Kernel("nvfp4 (gs given)", 16, lambda x: (*qn(x, 16, gs), gs), lambda p, dt: dn(p[0], p[1], p[2], 16, dt))


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- timing ------------------------------------------------------------------------------------------------


def bench_us(fn: Callable[[], object], smoke: bool, rep_ms: int = 60) -> float:
    """Median µs of ``fn``: do_bench on CUDA (L2 flushed between runs), a wall clock in --smoke."""
    if smoke:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(times)
    import triton.testing  # noqa: PLC0415

    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def graph_us(fn: Callable[[int], object], n_sets: int, reps: int = 3, replays: int = 7) -> float:
    """Median GPU µs per call of ``fn(i)``, i cycling over ``n_sets`` input sets, from CUDA-graph replays.

    A graph holds ``reps * n_sets`` calls, so host-side costs (the custom-op dispatch, the Triton
    launcher, allocation) drop out and only device time is left; rotating over input sets larger
    together than the L2 cache keeps each call reading from HBM."""
    for i in range(n_sets):
        fn(i)  # compile, fill caches, allocate outside the capture
    torch.cuda.synchronize()

    def body() -> None:
        for _ in range(reps):
            for i in range(n_sets):
                fn(i)

    return 1e3 * replay_ms(capture(body), replays) / (reps * n_sets)


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = (1 << 14) if smoke else (1 << 28)  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), smoke, rep_ms=200)
    return 2 * src.numel() * src.element_size() / us / 1e3


# ---- bitsandbytes ------------------------------------------------------------------------------------------


def bnb_kernels() -> list[Kernel]:
    """bitsandbytes' nf4, fp4 and 8-bit blockwise (dynamic code) at block 64, or [] if not installed."""
    try:
        import bitsandbytes.functional as F  # noqa: N812, PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        print(f"bitsandbytes unavailable: {exc}", file=sys.stderr)
        return []

    def q4(kind: str) -> Kernel:
        return Kernel(
            f"bnb-{kind}",
            64,
            lambda x: F.quantize_4bit(x, blocksize=64, quant_type=kind),
            lambda p, dt: F.dequantize_4bit(p[0], p[1]),
        )

    return [
        q4("nf4"),
        q4("fp4"),
        Kernel(
            "bnb-8bit",
            64,
            lambda x: F.quantize_blockwise(x, blocksize=64),
            lambda p, dt: F.dequantize_blockwise(p[0], p[1]),
        ),
    ]


# ---- the run ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    impl: str  # quanta | reference | bitsandbytes
    scheme: str
    shape: str
    dtype: str
    q_us: float
    d_us: float
    q_bytes: int
    d_bytes: int
    q_floor_us: float
    d_floor_us: float
    mae: float | None
    bytes_per_elem: float

    @property
    def q_ratio(self) -> float:
        return self.q_us / self.q_floor_us

    @property
    def d_ratio(self) -> float:
        return self.d_us / self.d_floor_us


N_SETS = 4  # input sets rotated through in graph timing (4 x 25 MB of nf4 codes already exceed the L2)


def measure(k: Kernel, impl: str, x: Tensor, bw: float, smoke: bool, rep_ms: int, with_mae: bool) -> Row:
    """Time one kernel pair on ``x``; bytes = x + stored tensors each way (bitsandbytes: codes + absmax).

    quanta: CUDA-graph replays over ``N_SETS`` copies of the input (device time). bitsandbytes (which
    copies host tensors or launches off the capturing stream, so it cannot be graph-captured) and the
    eager reference (both device-bound at these sizes): ``do_bench``."""
    parts = k.quantize(x)
    stored = nbytes(parts[0], parts[1].absmax) if impl == "bitsandbytes" else nbytes(*parts)
    moved = nbytes(x) + stored  # quantize reads x, writes the parts; dequantize the reverse
    if impl != "quanta" or smoke:
        q_us = bench_us(lambda: k.quantize(x), smoke, rep_ms)
        d_us = bench_us(lambda: k.dequantize(parts, x.dtype), smoke, rep_ms)
    else:
        xs = [x] + [x.clone() for _ in range(N_SETS - 1)]
        sets = [parts] + [k.quantize(xi) for xi in xs[1:]]
        q_us = graph_us(lambda i: k.quantize(xs[i]), N_SETS)
        d_us = graph_us(lambda i: k.dequantize(sets[i], x.dtype), N_SETS)
        del xs, sets
    mae = None
    if with_mae:
        mae = (k.dequantize(parts, x.dtype).float() - x.float()).abs().mean().item()
    floor_us = moved / bw / 1e3
    shape = "x".join(map(str, x.shape))
    dtype = str(x.dtype).removeprefix("torch.")
    return Row(impl, k.name, shape, dtype, q_us, d_us, moved, moved, floor_us, floor_us, mae, stored / x.numel())


def try_measure(
    rows: list[Row], k: Kernel, impl: str, x: Tensor, bw: float, smoke: bool, rep_ms: int, mae: bool
) -> None:
    """measure() into ``rows``; a failure is reported and skipped so one broken case costs one row."""
    try:
        rows.append(measure(k, impl, x, bw, smoke, rep_ms, mae))
    except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
        print(f"FAILED {impl} {k.name} {tuple(x.shape)} {x.dtype}: {exc!r}"[:400], flush=True)
        return
    _print_row(rows[-1])


def _print_row(r: Row) -> None:
    print(
        f"{r.impl:12s} {r.scheme:16s} {r.shape:>11s} {r.dtype:8s} q {r.q_us:9.1f} us ({r.q_ratio:5.2f}x)"
        f"  d {r.d_us:9.1f} us ({r.d_ratio:5.2f}x)",
        flush=True,
    )


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = [(64, 256), (32, 512)] if args.smoke else SHAPES
    seed_shape = shapes[0]
    bw = copy_bandwidth(device, args.smoke)
    print(f"copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    ours, ref = select(kernels("triton", device), args.schemes), select(kernels("reference", device), args.schemes)
    bnb = [] if args.smoke or (args.schemes and "bnb" not in args.schemes) else bnb_kernels()
    rows: list[Row] = []
    # fp16 on every shape; bf16 and fp32 on the seed shape (the device time of one session is short).
    plan = [(s, torch.float16) for s in shapes] + [(seed_shape, torch.bfloat16), (seed_shape, torch.float32)]
    for shape, dtype in plan:
        torch.manual_seed(0)
        x = torch.randn(shape, device=device).to(dtype)
        seed = shape == seed_shape and dtype == torch.float16
        for k in ours:
            try_measure(rows, k, "quanta", x, bw, args.smoke, args.rep_ms, seed)
        if not args.smoke and (not args.schemes or "nvfp4" in args.schemes):
            try_measure(rows, nvfp4_given_scale(x, device), "quanta", x, bw, False, args.rep_ms, False)
        for k in bnb:
            try_measure(rows, k, "bitsandbytes", x, bw, args.smoke, args.rep_ms, seed)
        if dtype == torch.float16:
            for k in ref:
                try_measure(rows, k, "reference", x, bw, args.smoke, 100, False)
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_gbps": bw,
        "rows": [asdict(r) | {"q_ratio": r.q_ratio, "d_ratio": r.d_ratio} for r in rows],
    }


def select(ks: list[Kernel], schemes: list[str] | None) -> list[Kernel]:
    """The kernels named in ``schemes`` (all when None)."""
    return ks if not schemes else [k for k in ks if k.name in schemes]


def merge(old: dict, new: dict) -> dict:
    """``new``'s run over ``old``: rows of the same (impl, scheme, shape, dtype) replaced, the others kept
    in their places, new ones appended; the header (device, date, command, copy bandwidth) is new's."""
    key = lambda r: (r["impl"], r["scheme"], r["shape"], r["dtype"])  # noqa: E731
    fresh = {key(r): r for r in new["rows"]}
    rows = [fresh.pop(key(r), r) for r in old["rows"]]
    return new | {"rows": rows + list(fresh.values()), "merged_into": old.get("command", "")}


def sweep(args: argparse.Namespace) -> list[dict]:
    """Tile size x warps for a few kernels on the seed shape (fp16): the data behind common.TILE (the integer
    quantize kernels' grouped tiling is ``integer.LANE_PLAN`` instead, so int8 shows only its dequantize)."""
    from quantize_cli.kernels.triton import common  # noqa: PLC0415

    device = torch.device("cuda")
    bw = copy_bandwidth(device, False)
    x = torch.randn(SEED_SHAPE, device=device, dtype=torch.float16)
    picks = [k for k in kernels("triton", device) if k.name in ("nf4", "int8", "fp8")]
    picks.append(nvfp4_given_scale(x, device))
    out = []
    for tile in (2048, 4096, 8192):
        for warps in (4, 8):
            common.TILE = common.DEQUANT_TILE = tile
            common.NUM_WARPS = warps
            rows: list[Row] = []
            for k in picks:
                print(f"tile {tile:5d} warps {warps}", end=" ")
                try_measure(rows, k, "quanta", x, bw, False, 30, False)
            out += [{"tile": tile, "warps": warps} | asdict(r) for r in rows]
    return out


# ---- reporting ----------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown(res: dict) -> str:
    rows = res["rows"]
    out = [
        f"Device: {res['device']}; {res['date']}; torch {res['torch']}, Triton {res['triton']}.",
        f"Command: `{res['command']}`. Device-to-device copy: {res['copy_gbps']:,.0f} GB/s (bytes read + written);",
        "floor = (bytes read + bytes written) / that bandwidth; ratio = measured / floor (target <= 1.3).",
        "µs per call: device time of the kernel-level ops that `quantize(..., backend=)` dispatches to, from",
        f"CUDA-graph replays rotating over {N_SETS} input copies (no host overhead, no L2 reuse; median of 7",
        "replays of 3 x 4 calls); bitsandbytes (not graph-capturable) and the eager reference with",
        "`triton.testing.do_bench` (median, L2 flushed between calls).",
        "The public API adds an isfinite check of the input (one more read) and the custom-op dispatch.",
        "",
        "| scheme | shape | dtype | quantize µs | GB/s | ratio | dequantize µs | GB/s | ratio | eager ref q / d µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {(r["scheme"], r["shape"], r["dtype"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        if r["impl"] != "quanta":
            continue
        e = ref.get((r["scheme"], r["shape"], r["dtype"]))
        eager = f"{_fmt(e['q_us'])} / {_fmt(e['d_us'])}" if e else "-"
        out.append(
            f"| {r['scheme']} | {r['shape']} | {r['dtype']} | {_fmt(r['q_us'])} | {r['q_bytes'] / r['q_us'] / 1e3:,.0f}"
            f" | {r['q_ratio']:.2f} | {_fmt(r['d_us'])} | {r['d_bytes'] / r['d_us'] / 1e3:,.0f} | {r['d_ratio']:.2f}"
            f" | {eager} |"
        )
    bnb = [r for r in rows if r["impl"] == "bitsandbytes"]
    if bnb:
        out += [
            "",
            "bitsandbytes (block 64), same inputs and floor:",
            "",
            "| scheme | shape | dtype | quantize µs | ratio | dequantize µs | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in bnb:
            out.append(
                f"| {r['scheme']} | {r['shape']} | {r['dtype']} | {_fmt(r['q_us'])} | {r['q_ratio']:.2f}"
                f" | {_fmt(r['d_us'])} | {r['d_ratio']:.2f} |"
            )
    seed = [r for r in rows if r["mae"] is not None]
    if seed:
        out += [
            "",
            f"Seed table, regenerated: standard normal {seed[0]['shape']} {seed[0]['dtype']} weight, default blocks"
            " (64 for nf4/fp4/nf8/int8 and bitsandbytes).",
            "",
            "| Scheme | Impl | Quantize (µs) | Dequantize (µs) | MAE | Bytes/elem |",
            "|---|---|---|---|---|---|",
        ]
        for r in seed:
            impl = "bnb" if r["impl"] == "bitsandbytes" else "quanta"
            out.append(
                f"| {r['scheme'].removeprefix('bnb-')} | {impl} | {_fmt(r['q_us'])} | {_fmt(r['d_us'])}"
                f" | {r['mae']:.4f} | {r['bytes_per_elem']:.3f} |"
            )
    return "\n".join(out) + "\n"


def plots(res: dict, out: Path) -> list[Path]:
    """Latency per scheme (seed shape, fp16) and ratio to the floor for every measured case."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib unavailable: no plots", file=sys.stderr)
        return []
    rows = res["rows"]
    seed_shape = "x".join(map(str, SEED_SHAPE))
    seed = [r for r in rows if r["shape"] == seed_shape and r["dtype"] == "float16"]
    ours = [r for r in seed if r["impl"] == "quanta"]
    bnb = {r["scheme"].removeprefix("bnb-").replace("8bit", "int8"): r for r in seed if r["impl"] == "bitsandbytes"}
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, key, title in [(axes[0], "q", "quantize"), (axes[1], "d", "dequantize")]:
        names = [r["scheme"] for r in ours]
        xs = list(range(len(names)))
        ax.bar([i - 0.27 for i in xs], [r[f"{key}_floor_us"] for r in ours], 0.27, label="floor", color="0.75")
        ax.bar(xs, [r[f"{key}_us"] for r in ours], 0.27, label="quanta (Triton)", color="tab:blue")
        bnb_us = [bnb[n][f"{key}_us"] if n in bnb else 0.0 for n in names]
        ax.bar([i + 0.27 for i in xs], bnb_us, 0.27, label="bitsandbytes", color="tab:orange")
        ax.set_xticks(xs, names, rotation=40, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{title}, fp16 {seed_shape}")
        ax.set_ylabel("µs (median)")
        ax.legend()
    fig.tight_layout()
    paths.append(out / "kernels_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    cases = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows if r["impl"] == "quanta"))
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 4.5), sharey=True, squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], cases, strict=True):
        case = [r for r in rows if r["impl"] == "quanta" and r["shape"] == shape and r["dtype"] == dtype]
        xs = list(range(len(case)))
        ax.bar([i - 0.2 for i in xs], [r["q_ratio"] for r in case], 0.4, label="quantize")
        ax.bar([i + 0.2 for i in xs], [r["d_ratio"] for r in case], 0.4, label="dequantize")
        ax.axhline(1.3, color="red", linestyle="--", label="1.3x target")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(xs, [r["scheme"].replace(" (gs given)", "\n(gs given)") for r in case], rotation=60, fontsize=8)
        ax.set_title(f"{shape} {dtype}", fontsize=10)
    axes[0][0].set_ylabel("measured / floor")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Ratio to the memory floor ({res['device']}, copy {res['copy_gbps']:,.0f} GB/s)")
    fig.tight_layout()
    paths.append(out / "kernels_ratio.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for json, md and png (default: benchmarks/; --smoke: none)"
    )
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--sweep", action="store_true", help="only sweep tile sizes and warps (GPU)")
    parser.add_argument("--replot", type=Path, help="rebuild kernels.md and the plots from a kernels.json")
    parser.add_argument(
        "--schemes",
        type=lambda v: v.split(","),
        help="comma-separated subset (nf4,fp4,nf8,int8,int4,int4-asym,fp8,nvfp4,mxfp4; bnb for bitsandbytes)",
    )
    parser.add_argument("--merge", type=Path, help="a kernels.json whose rows this run replaces or extends")
    args = parser.parse_args()
    if args.out is None and args.smoke:  # a CPU check of the script must not overwrite the GPU results
        args.out = Path(tempfile.mkdtemp(prefix="quanta-kernels-smoke-"))
    args.out = args.out or Path("benchmarks")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        (args.out / "sweep.json").write_text(json.dumps(sweep(args), indent=1))
        return
    if args.replot:
        res = json.loads(args.replot.read_text())
    else:
        res = run(args)
        if args.merge:
            res = merge(json.loads(args.merge.read_text()), res)
        (args.out / "kernels.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "kernels.md").write_text(md)
    for p in plots(res, args.out):
        print(f"wrote {p}")
    print(md)


if __name__ == "__main__":
    main()
