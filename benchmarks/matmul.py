"""Matmul benchmark: quantized Linear layers against fp16 ``nn.Linear`` and bitsandbytes, and tokens/s.

Table mode (default): for each weight shape (out x in) and batch, the median µs of one forward of
fp16 ``nn.Linear``, ``QuantLinear`` in every scheme (``int8-static``: W8A8 through ``torch._int_mm``),
and bitsandbytes' ``Linear4bit`` (nf4, fp16 compute) and ``Linear8bitLt`` (``has_fp16_weights=False``),
all without bias, timed the same way: ``triton.testing.do_bench`` (the L2 cache is flushed before every
call, so each call reads its weight from HBM, as one decoding step of an LLM does). Each quanta row
also checks its output against the fp32 reference ``x.float() @ dequantize(W).float().T``.

Tokens/s mode (``--model DIR``, an HF folder): converts it to nf4 and int8 with quanta's library API in
a temporary folder, reloads each on CUDA in fp16 (``load_quantized``) and times greedy ``generate`` of
``--new-tokens`` tokens at batch 1 after a warm-up, against the fp16 model.

``--sweep``: GEMV tilings and the GEMV / dequantize + cuBLAS crossover (``nn.fused.FUSED_MAX_ROWS``).

    PYTHONPATH=.bnb:. python benchmarks/matmul.py --out DIR [--model .bench/smollm2]   # on a CUDA GPU
    python benchmarks/matmul.py --sweep --out DIR
    TRITON_INTERPRET=1 python benchmarks/matmul.py --smoke          # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quantize_cli import QuantLinear, dequantize
from quantize_cli.kernels.triton import matmul
from quantize_cli.nn import functional, fused
from quantize_cli.nn.functional import fp8_activations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_kernels import bench_us  # noqa: E402 - the sibling benchmark's timers
from quant_kernels import graph_us as kernel_graph_us  # noqa: E402

Tensor = torch.Tensor
SHAPES = [(4096, 11008), (11008, 4096)]  # (out_features, in_features)
BATCHES = [1, 16, 4096]
SCHEMES = ["nf4", "fp4", "int4", "int8", "nf8", "fp8", "fp8-a8", "nvfp4", "mxfp4", "int8-static"]
COPY_GBPS = 3000.0  # H100 device-to-device copy, bytes read + written (DESIGN §5); for the floor column
# Targets (DESIGN §5, issue #7): 4-bit at batch 1 >= 2.5x faster than fp16, batch 16 no slower, 4096 within 1.1x.
TARGETS = {1: 1 / 2.5, 16: 1.0, 4096: 1.1}  # max allowed (4-bit µs) / (fp16 µs)
FOUR_BIT = ("nf4", "fp4", "int4")


# ---- the layers -------------------------------------------------------------------------------------------


class Fp8Activations(nn.Module):
    """An fp8 QuantLinear run inside ``fp8_activations()``: W8A8 fp8 (``torch._scaled_mm`` on Hopper)."""

    def __init__(self, inner: QuantLinear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        with fp8_activations():
            return self.inner(x)


def quanta_layer(linear: nn.Linear, scheme: str, calib: Tensor) -> nn.Module:
    """``linear`` quantized with ``scheme`` (int8-static: static input scale from ``calib``; fp8-a8: fp8
    weights with fp8 activations)."""
    if scheme == "int8-static":
        return QuantLinear.from_linear(linear, scheme, input_scale=calib.float().abs().amax() / 127)
    if scheme == "fp8-a8":
        return Fp8Activations(QuantLinear.from_linear(linear, "fp8"))
    return QuantLinear.from_linear(linear, scheme)


def bnb_layers(linear: nn.Linear) -> dict[str, nn.Module]:
    """bitsandbytes' Linear4bit (nf4, fp16 compute) and Linear8bitLt (int8 weights), or {} if missing."""
    try:
        import bitsandbytes as bnb  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        print(f"bitsandbytes unavailable: {exc}", file=sys.stderr)
        return {}
    out_f, in_f = linear.weight.shape
    w = linear.weight.detach().cpu()
    four = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float16, quant_type="nf4")
    four.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    eight = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    eight.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    return {"bnb-nf4": four.cuda(), "bnb-int8": eight.cuda()}


# ---- the table --------------------------------------------------------------------------------------------


@dataclass
class Row:
    impl: str  # fp16 | quanta | bitsandbytes
    scheme: str
    shape: str  # out x in
    batch: int
    us: float  # eager: do_bench, L2 flushed before each call (host overhead shows where it exceeds the flush)
    graph_us: float | None  # device time: CUDA-graph replays over copies of the layer (None: not captured)
    fp16_us: float
    fp16_graph_us: float | None
    floor_us: float  # (weight bytes + x + y) / copy bandwidth
    rel_err: float | None  # max |y - ref| / max |ref| against the fp32 reference (quanta rows)

    @property
    def ratio(self) -> float:
        """Eager µs / fp16 eager µs: below 1 is faster than fp16."""
        return self.us / self.fp16_us

    @property
    def graph_ratio(self) -> float | None:
        """Device-time ratio to fp16 (CUDA graphs), where both were captured."""
        if self.graph_us is None or self.fp16_graph_us is None:
            return None
        return self.graph_us / self.fp16_graph_us

    @property
    def best_ratio(self) -> float:
        """The ratio the targets are judged on: device time where captured, else eager."""
        return self.graph_ratio if self.graph_ratio is not None else self.ratio


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the stored weight tensors (codes, scales, ...; bitsandbytes: codes + absmax)."""
    if isinstance(module, Fp8Activations):
        module = module.inner
    if isinstance(module, QuantLinear):
        return module.quant_state().nbytes
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    w = module.weight
    extra = getattr(getattr(w, "quant_state", None), "absmax", None)
    scb = getattr(w, "SCB", None)
    return sum(t.numel() * t.element_size() for t in (w, extra, scb) if t is not None)


def rel_error(module: nn.Module, x: Tensor) -> float:
    """max |module(x) - x @ dequantize(W).T| / max |ref|, the reference in fp32 (fp8-a8: the fp32
    product of the same fp8 activations, ``functional.fp8_emulated_matmul``)."""
    with torch.no_grad():
        y = module(x).float()
    if isinstance(module, Fp8Activations):
        state = module.inner.quant_state()
        xp = nn.functional.pad(x, (0, state.qdata.shape[1] - x.shape[-1]))
        ref = functional.fp8_emulated_matmul(*functional.quantize_fp8_groups(xp, state.block_size), state)
        return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    ref_x = x.float()
    if module.input_scale is not None:
        s = module.input_scale.float()
        ref_x = torch.round(ref_x / s).clamp(-127, 127) * s
    ref = ref_x @ dequantize(module.quant_state()).float().T
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def graph_us(calls: list[Callable[[], object]], reps: int = 3, replays: int = 10) -> float:
    """Median device µs per call from CUDA-graph replays of ``reps`` rounds over ``calls`` (one per copy
    of a layer; the copies together exceed the L2 cache, so each call reads its weight from HBM): the
    graph drops host costs (Python, launch) and leaves only the kernels' time (``quant_kernels.graph_us``)."""
    return kernel_graph_us(lambda i: calls[i](), len(calls), reps, replays)


def n_copies(module: nn.Module) -> int:
    """Copies of a layer whose weights together fill twice the L2 cache (2 to 8)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(8, -(-2 * l2 // max(1, weight_bytes(module)))))


def build_layers(
    linear: nn.Linear, calib: Tensor, smoke: bool, schemes: list[str]
) -> dict[str, tuple[str, list[nn.Module]]]:
    """name -> (impl, copies): fp16, every quanta scheme, bitsandbytes; copies for graph timing on CUDA."""

    def copies(make: Callable[[], nn.Module]) -> list[nn.Module]:
        first = make()
        return [first] + ([] if smoke else [make() for _ in range(n_copies(first) - 1)])

    def fp16() -> nn.Linear:
        w = linear.weight
        out = nn.Linear(linear.in_features, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
        return out

    layers = {"fp16": ("fp16", copies(fp16))}
    for scheme in [s for s in SCHEMES if s in schemes]:
        try:
            layers[scheme] = ("quanta", copies(lambda s=scheme: quanta_layer(linear, s, calib)))
        except Exception as exc:  # noqa: BLE001 - one broken scheme costs its rows only
            print(f"FAILED to build {scheme}: {exc!r}"[:400], flush=True)
    if not smoke and set(schemes) & {"bnb-nf4", "bnb-int8"}:  # bitsandbytes: eager only, not graph-captured
        found = bnb_layers(linear).items()
        layers.update({name: ("bitsandbytes", [module]) for name, module in found if name in schemes})
    return layers


def measure(name: str, impl: str, mods: list[nn.Module], x: Tensor, smoke: bool) -> tuple[float, float | None]:
    """(eager µs, graph µs or None) of ``mods[0](x)``; warms every copy first (compiles, tunes)."""
    with torch.inference_mode():
        for m in mods:
            m(x)
        eager = bench_us(lambda: mods[0](x), smoke, 100)
        graph = None
        if not smoke and impl != "bitsandbytes":
            try:
                graph = graph_us([lambda m=m: m(x) for m in mods])
            except Exception as exc:  # noqa: BLE001 - report; the eager time still stands
                print(f"no graph for {name}: {exc!r}"[:300], flush=True)
    return eager, graph


def table(args: argparse.Namespace) -> list[Row]:
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = [(48, 200)] if args.smoke else SHAPES
    batches = [1, 16, 40] if args.smoke else args.batches
    rows: list[Row] = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.float16)
        calib = torch.randn(64, in_f, device=device, dtype=torch.float16)
        layers = build_layers(linear, calib, args.smoke, args.schemes)
        for batch in batches:
            x = torch.randn(batch, in_f, device=device, dtype=torch.float16)
            base: tuple[float, float | None] = (0.0, None)
            for name, (impl, mods) in layers.items():
                try:
                    us, g_us = measure(name, impl, mods, x, args.smoke)
                    err = rel_error(mods[0], x) if impl == "quanta" else None
                except Exception as exc:  # noqa: BLE001 - report and go on with the other rows
                    print(f"FAILED {name} {out_f}x{in_f} batch {batch}: {exc!r}"[:400], flush=True)
                    continue
                base = (us, g_us) if name == "fp16" else base
                moved = weight_bytes(mods[0]) + 2 * batch * (in_f + out_f)
                floor = moved / COPY_GBPS / 1e3
                row = Row(impl, name, f"{out_f}x{in_f}", batch, us, g_us, *base, floor, err)
                rows.append(row)
                graph = f"{g_us:9.1f} us graph" if g_us is not None else " " * 18
                print(
                    f"{row.shape:>11s} b{batch:<5d} {name:12s} {us:9.1f} us eager {graph}  {row.best_ratio:5.2f}x"
                    f"  floor {floor:7.1f}" + (f"  err {err:.1e}" if err is not None else ""),
                    flush=True,
                )
            del x
        del layers, linear
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def target_lines(rows: list[Row]) -> list[str]:
    """One line per (4-bit layer, batch) with a target: its worst ratio over the shapes, met or not."""
    lines = []
    for batch, limit in TARGETS.items():
        for scheme in (*FOUR_BIT, "bnb-nf4"):
            got = [r for r in rows if r.scheme == scheme and r.batch == batch]
            if not got:
                continue
            worst = max(got, key=lambda r: r.best_ratio)
            how = "device time" if worst.graph_ratio is not None else "eager"
            verdict = "met" if worst.best_ratio <= limit else f"gap: {worst.best_ratio / limit:.2f}x over"
            want = f"<= {limit:.2f}x fp16 time" + (f" ({1 / limit:.1f}x faster)" if limit < 1 else "")
            lines.append(
                f"- batch {batch}, {scheme}: worst {worst.best_ratio:.2f}x fp16 time ({how}, {worst.shape}); "
                f"target {want}: {verdict}"
            )
    return lines


def markdown(rows: list[Row], meta: dict, tokens: list[dict]) -> str:
    """The table: one line per (shape, batch, layer), µs and ratio to fp16, then the targets."""
    out = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bnb']}; "
        f"{meta['date']}.",
        f"Command: `{meta['command']}`. fp16 input, no bias. device µs: median of CUDA-graph replays over "
        "copies of the layer that together exceed the L2 cache (kernels only; bitsandbytes is not captured); "
        "eager µs: median `do_bench` of one Python call, L2 flushed before each (host overhead counts where "
        "it exceeds the flush). Ratios are to fp16 `nn.Linear` in the same column (below 1: faster). "
        f"floor = (weight + input + output bytes) / {COPY_GBPS:.0f} GB/s; err = max |y - ref| / max |ref| "
        "against the fp32 reference `x.float() @ dequantize(W).float().T`.",
        "",
        "| shape (out x in) | batch | layer | device µs | vs fp16 | eager µs | vs fp16 | floor µs | err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r.scheme if r.impl != "quanta" else f"quanta {r.scheme}"
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else "-"
        dev = f"{r.graph_us:,.1f} | {r.graph_ratio:.2f}x" if r.graph_ratio is not None else "- | -"
        out.append(
            f"| {r.shape} | {r.batch} | {label} | {dev} | {r.us:,.1f} | {r.ratio:.2f}x | {r.floor_us:,.1f} | {err} |"
        )
    out += ["", "Targets (worst shape; device time where captured):", *target_lines(rows)]
    if tokens:
        out += ["", "| model | new tokens | s | tokens/s | vs fp16 |", "|---|---|---|---|---|"]
        base = tokens[0]["tokens_per_s"]
        for t in tokens:
            out.append(
                f"| {t['label']} | {t['new_tokens']} | {t['seconds']:.2f} | {t['tokens_per_s']:.1f} | "
                f"{t['tokens_per_s'] / base:.2f}x |"
            )
    return "\n".join(out) + "\n"


# ---- tokens/s ---------------------------------------------------------------------------------------------


def time_generate(model: nn.Module, input_ids: Tensor, new_tokens: int) -> float:
    """Seconds for greedy ``generate`` of exactly ``new_tokens`` tokens (EOS ignored), after a warm-up."""

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=model.generation_config.eos_token_id,
            )

    def sync() -> None:
        if input_ids.is_cuda:
            torch.cuda.synchronize()

    run(8)
    sync()
    t0 = time.perf_counter()
    run(new_tokens)
    sync()
    return time.perf_counter() - t0


def with_weights(model_dir: Path, tmp: Path) -> Path:
    """``model_dir`` if it holds safetensors weights, else a copy of it with random weights built from its
    config.json (speed does not depend on the values; a folder of config and tokenizer files travels
    where the real weights are too large to)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    if any(model_dir.glob("*.safetensors")):
        return model_dir
    out = tmp / "random-weights"
    shutil.copytree(model_dir, out)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    print(f"{model_dir} has no weights: built random ones from its config.json", flush=True)
    return out


def tokens_per_second(model_dir: Path, new_tokens: int, device: str) -> list[dict]:
    """fp16 vs nf4 vs int8 (converted here with ``quantize_cli.convert``) greedy generation at batch 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from quantize_cli import convert, load_quantized  # noqa: PLC0415

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        source = with_weights(model_dir, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.to(device)
        fp16 = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).to(device).eval()
        results.append({"label": "fp16 (transformers)", "seconds": time_generate(fp16, ids, new_tokens)})
        del fp16
        for scheme in ("nf4", "int8"):
            out = Path(tmp) / scheme
            convert(str(source), scheme=scheme, out=out, device=device, progress=False)
            model = load_quantized(out, device=device, dtype=torch.float16)
            results.append({"label": f"quanta {scheme}", "seconds": time_generate(model, ids, new_tokens)})
            del model
    for r in results:
        r["new_tokens"] = new_tokens
        r["tokens_per_s"] = new_tokens / r["seconds"]
        print(f"{r['label']:22s} {r['tokens_per_s']:8.1f} tokens/s", flush=True)
    return results


# ---- sweep ------------------------------------------------------------------------------------------------


def sweep_tilings(linear: nn.Linear, scheme: str) -> list[dict]:
    """µs (do_bench) and max relative error of every candidate tiling at batches 1 and 16."""
    out_f, in_f = linear.weight.shape
    state = QuantLinear.from_linear(linear, scheme).quant_state()
    w_ref = dequantize(state).float()
    args = fused.decode_args(state)
    kp = state.scale.shape[1] * state.block_size
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch in (1, 16):
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
        ref = x.float() @ w_ref.T
        for cfg in matmul.candidates(batch, out_f, kp, args["bits"], state.block_size, sms):
            try:
                err = ((fused.gemv_linear(x, state, None, cfg).float() - ref).abs().max() / ref.abs().max()).item()
                us = bench_us(lambda c=cfg, x=x: fused.gemv_linear(x, state, None, c), False, 50)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other tilings
                print(f"FAILED {scheme} {cfg}: {exc!r}"[:300], flush=True)
                continue
            rows.append({"shape": f"{out_f}x{in_f}", "scheme": scheme, "batch": batch, "us": us, "err": err})
            rows[-1]["config"] = asdict(cfg)
            print(f"{out_f}x{in_f} {scheme:5s} b{batch:<3d} {us:8.1f} us err {err:.1e} {cfg}", flush=True)
    return rows


def crossover(linear: nn.Linear, scheme: str, batches: list[int]) -> list[dict]:
    """Device µs (CUDA graphs over 4 copies of the weight) of the GEMV (tuned tiling) and of dequantize +
    cuBLAS at each batch: the data behind ``nn.fused``'s row limits."""
    from quantize_cli.nn.functional import dequantize_linear  # noqa: PLC0415

    out_f, in_f = linear.weight.shape
    states = [QuantLinear.from_linear(linear, scheme).quant_state() for _ in range(4)]
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
        us = {}
        for path, fn in (("fused_us", fused.gemv_linear), ("dequant_us", dequantize_linear)):
            with torch.inference_mode():
                for st in states:
                    fn(x, st, None)  # compile and tune outside the capture
                us[path] = graph_us([lambda st=st, fn=fn, x=x: fn(x, st, None) for st in states])
        rows.append({"shape": f"{out_f}x{in_f}", "scheme": scheme, "batch": batch} | us)
        print(
            f"{out_f}x{in_f} {scheme:5s} b{batch:<3d} " + "  ".join(f"{k} {v:8.1f}" for k, v in us.items()), flush=True
        )
    return rows


def sweep(args: argparse.Namespace) -> list[dict]:
    """Every candidate tiling of each fused scheme (unless --crossover) and the GEMV / dequantize crossover."""
    out = []
    schemes = [s for s in fused.FUSED_SCHEMES if s in args.schemes]
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.float16)
        for scheme in schemes:
            out += [] if args.crossover else sweep_tilings(linear, scheme)
            out += crossover(linear, scheme, args.batches)
    return out


# ---- main -------------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict:
    try:
        import bitsandbytes as bnb  # noqa: PLC0415

        bnb_version = bnb.__version__
    except Exception:  # noqa: BLE001
        bnb_version = "not installed"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "bnb": bnb_version,
    }


def write(out: Path | None, meta: dict, rows: list[Row], tokens: list[dict]) -> str:
    """matmul.md and matmul.json into ``out`` (when given); returns the markdown."""
    text = markdown(rows, meta, tokens)
    if out:
        tuned = [{"key": [str(k) for k in key], "config": asdict(cfg)} for key, cfg in matmul.tuned_configs().items()]
        times = fused.fused_timings()
        paths = [
            {"key": [str(k) for k in key], "fused": won, "fused_us": times[key][0], "dequant_us": times[key][1]}
            for key, won in fused.fused_choices().items()
        ]
        extra = [{"ratio": r.ratio, "graph_ratio": r.graph_ratio} for r in rows]
        data = {
            **meta,
            "rows": [asdict(r) | e for r, e in zip(rows, extra, strict=True)],
            "tokens": tokens,
            "tuned": tuned,
            "paths": paths,
        }
        (out / "matmul.json").write_text(json.dumps(data, indent=1))
        (out / "matmul.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for matmul.json and matmul.md")
    parser.add_argument("--model", type=Path, default=None, help="HF folder for the tokens/s comparison")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="GEMV tilings and the fused/cuBLAS crossover")
    parser.add_argument("--crossover", action="store_true", help="with --sweep: the crossover only")
    parser.add_argument("--schemes", type=lambda v: v.split(","), default=[*SCHEMES, "bnb-nf4", "bnb-int8"])
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=BATCHES)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    meta = environment(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        result = sweep(args)
        if args.out:
            (args.out / "matmul_sweep.json").write_text(json.dumps({**meta, "rows": result}, indent=1))
        return
    rows = table(args)
    write(args.out, meta, rows, [])  # the table survives a failure of the tokens/s run
    device = "cpu" if args.smoke else "cuda"
    tokens = tokens_per_second(args.model, args.new_tokens, device) if args.model else []
    print(write(args.out, meta, rows, tokens))


if __name__ == "__main__":
    main()
