"""The ``quanta`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import QuantaError
from .kernels.ops import has_triton
from .schemes import SCHEMES, scheme_names

app = typer.Typer(
    name="quanta",
    help="Quantize Hugging Face models: stream a checkpoint through nf4/fp4/int8/int4/nf8/fp8/NVFP4/MXFP4 "
    "into a safetensors folder, reload it, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Shared options, declared once.
ModelArg = Annotated[
    str, typer.Argument(help="Hub id, local model folder, or a .safetensors file.", show_default=False)
]
DirArg = Annotated[str, typer.Argument(help="A folder written by `quanta convert`.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where to compute: auto (CUDA if present), cpu or cuda.")]
SchemeOpt = Annotated[
    str, typer.Option("--scheme", "-s", help=f"Quantization scheme: {', '.join(scheme_names(True))}.")
]
BlockOpt = Annotated[
    int | None, typer.Option("--block-size", "-b", help="Elements per scale block (default: the scheme's).")
]
_SMOOTH = (
    "SmoothQuant for W8A8 (int8-static): each Linear input's channel j is divided by s_j = max|x_j|^a / "
    "max|W[:,j]|^(1-a), folded into the preceding norm or Linear (the weight columns take s), so one static "
    "int8 scale fits. "
)
SmoothCalibrateOpt = Annotated[
    str,
    typer.Option(
        "--smooth",
        help=_SMOOTH + "auto: per layer group the a in 0.3..0.9 with the least W8A8 output error on the "
        "calibration data; a number in [0, 1]: that a everywhere; off: no factors.",
    ),
]
SmoothConvertOpt = Annotated[
    str,
    typer.Option(
        "--smooth",
        help=_SMOOTH + "auto: fold the factors of the statistics (calibrating now with --data: a searched per "
        "layer group); a number in [0, 1]: that a (the statistics must have been made with it); off: none.",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="Named data set (wikitext, c4, pile) or a local .txt/.jsonl/.parquet file or folder."),
]


def _fail(message: str) -> None:
    # escape: a message may quote user text with brackets (a regex, a tensor name) that rich would eat
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def handle_errors(fn: F) -> F:
    """Turn known errors into one line on stderr and exit code 2; ``QUANTA_DEBUG=1`` shows the traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (QuantaError, ValueError, FileNotFoundError, KeyError) as exc:
            if os.environ.get("QUANTA_DEBUG"):
                traceback.print_exc()
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            _fail(message.splitlines()[0] if message else type(exc).__name__)

    return wrapper  # type: ignore[return-value]


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"quanta {__version__}")
        raise typer.Exit()


@app.command()
def schemes() -> None:
    """List every registered scheme: bits per weight at its default block, calibration, Triton kernel."""
    table = Table(title="quanta schemes")
    for col in ("scheme", "aliases", "bits/weight", "default block", "calibration", "Triton kernel"):
        table.add_column(col, no_wrap=True)
    table.add_column("format", ratio=1)
    for s in SCHEMES.values():
        triton_ok = bool(s.kernel_ops) and all(has_triton(op) for op in s.kernel_ops)
        table.add_row(
            s.name,
            ", ".join(s.aliases) or "-",
            f"{s.bits_per_weight():g}",
            "row" if s.per_row else str(s.default_block_size or "-"),
            "yes" if s.needs_calibration else "no",
            "yes" if triton_ok else "no",
            s.description,
        )
    console.print(table)


@app.command()
@handle_errors
def convert(
    model: ModelArg,
    scheme: Annotated[
        str | None, typer.Option("--scheme", "-s", help=f"Scheme: {', '.join(scheme_names(True))} (default nf4).")
    ] = None,
    block_size: BlockOpt = None,
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="YAML recipe (see recipes/).")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Keep tensors matching a glob/re:regex.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder (default: <model>-<scheme>).")] = None,
    device: DeviceOpt = "auto",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest shard, e.g. 2GB, 500MB.")] = "2GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read .bin/.pt pickle weights.")] = False,
    method: Annotated[
        str | None, typer.Option("--method", help="nvfp4/mxfp4 block scales: naive, sse, or hessian (calibrated).")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", help="Statistics from `quanta calibrate` (int8-static, hessian).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Calibrate on this data first (int8-static: histogram clip, --smooth)."),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration sequences, with --data.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence, with --data.")] = 512,
    smooth: SmoothConvertOpt = "auto",
) -> None:
    """Stream MODEL tensor by tensor through a scheme into a quantized safetensors folder.

    int8-static folds the SmoothQuant smoothing of its calibration statistics into the weights (--smooth).
    """
    from .pipeline import convert as run_convert
    from .pipeline.convert import CalibrationInput

    def warn(message: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    result = run_convert(
        model, scheme, block_size, recipe, ignore or (), out, device, max_shard_size, overwrite, resume, revision,
        allow_pickle, progress=True, log=warn, method=method,
        calibration=CalibrationInput(calibration, data, samples, seq_len, smooth),
    )  # fmt: skip
    table = Table(show_header=False)
    for label, value in result.summary():
        table.add_row(label, escape(value))
    console.print(f"wrote {escape(str(result.out))} from {escape(result.source)}", highlight=False, soft_wrap=True)
    console.print(table)


@app.command()
@handle_errors
def calibrate(
    model: ModelArg,
    data: DataOpt = "wikitext",
    samples: Annotated[int, typer.Option("--samples", help="Number of calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.")] = 512,
    out: Annotated[str, typer.Option("--out", "-o", help="Calibration statistics file.")] = "calib.safetensors",
    observer: Annotated[
        str, typer.Option("--observer", help="Activation range: minmax, percentile, or histogram (MSE-optimal clip).")
    ] = "minmax",
    per_channel: Annotated[
        bool, typer.Option("--per-channel", help="Ranges per input channel, not per tensor.")
    ] = False,
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile for --observer percentile.")] = 99.99,
    hessian: Annotated[
        bool, typer.Option("--hessian/--no-hessian", help="Also collect X^T X per Linear (for --method hessian).")
    ] = True,
    device: DeviceOpt = "auto",
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    smooth: SmoothCalibrateOpt = "auto",
) -> None:
    """Run calibration data through MODEL one decoder layer at a time and save the statistics.

    Only the embeddings and one decoder layer are in memory at a time, so models larger than memory
    calibrate. The file feeds `quanta convert --calibration FILE` (int8-static, --method hessian). For
    Llama-family decoders it also holds SmoothQuant factors (--smooth) that int8-static folds into the weights;
    int8-static wants --observer histogram.
    """
    from .algorithms import parse_smooth
    from .calibration import CalibrationSettings
    from .calibration import calibrate as run_calibration

    settings = CalibrationSettings(observer, per_channel, percentile, hessian, device, smooth=parse_smooth(smooth))
    path = run_calibration(model, data, out, samples, seq_len, settings, revision, overwrite)
    console.print(f"wrote calibration statistics to [bold]{escape(str(path))}[/]")


@app.command("eval")
@handle_errors
def eval_(
    model: ModelArg,
    ppl: Annotated[bool, typer.Option("--ppl", help="Measure perplexity.")] = False,
    kld: Annotated[bool, typer.Option("--kld", help="KL divergence from --baseline, and top-1 agreement.")] = False,
    metrics: Annotated[bool, typer.Option("--metrics", help="Per-tensor error of a quanta folder.")] = False,
    data: Annotated[
        str | None,
        typer.Option("--data", help="wikitext, c4, pile, or a .txt/.jsonl/.parquet file or folder [--ppl: wikitext]."),
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 2048,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Use the first N windows.")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="Reference model for --kld.")] = None,
    kld_top_k: Annotated[
        int | None, typer.Option("--kld-top-k", help="Cache only the baseline's top K log-probs (default: all).")
    ] = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 1,
) -> None:
    """Evaluate a model or a quanta folder: perplexity, KL divergence, per-tensor error metrics."""
    from .eval import evaluate, report_tables

    report = evaluate(
        model, ppl=ppl, kld=kld, metrics=metrics, data=data, baseline=baseline, seq_len=seq_len,
        max_samples=max_samples, device=device, batch_size=batch_size, kld_top_k=kld_top_k, json_path=json_path,
    )  # fmt: skip
    for table in report_tables(report):
        console.print(table)


@app.command()
@handle_errors
def reload(
    path: DirArg,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Generate greedily from this prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate for --prompt.")] = 64,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Compute dtype: auto (the checkpoint's), float32, float16 or bfloat16.")
    ] = "auto",
    dequantize_to: Annotated[
        str | None, typer.Option("--dequantize-to", help="Write the dequantized float model to this new folder.")
    ] = None,
    fp8_activations: Annotated[
        bool,
        typer.Option(
            "--fp8-activations",
            help="fp8 weights: round activations to fp8 too (W8A8, dynamic per-128-column scales; "
            "torch._scaled_mm on Hopper GPUs).",
        ),
    ] = False,
) -> None:
    """Load a quanta folder into a transformers model with packed quantized Linear modules.

    Prints a summary, or with --prompt the greedy continuation (through the chat template if any).
    """
    from .format import read_map
    from .nn.functional import fp8_activations as fp8_context
    from .reload import dequantize_folder, generate, load_quantized, summarize
    from .schemes.base import parse_dtype

    compute = None if dtype == "auto" else parse_dtype(dtype)
    if fp8_activations and not any(e["scheme"] == "fp8" for e in read_map(path)["tensors"].values()):
        raise QuantaError(f"--fp8-activations: {path} has no fp8 weights (it applies to fp8 only)")
    if dequantize_to is not None:
        console.print(f"wrote {dequantize_folder(path, dequantize_to, progress=True)}", highlight=False)
        if prompt is None:
            return
    model = load_quantized(path, device=device, dtype=compute, progress=True)
    with fp8_context(fp8_activations):
        typer.echo(generate(model, path, prompt, max_new_tokens) if prompt is not None else summarize(model))


@app.command()
@handle_errors
def inspect(path: DirArg) -> None:
    """Summarise a quanta folder: tensors by scheme, bits per weight, size against the source."""
    from .pipeline import inspect_folder

    report = inspect_folder(path)
    for label, value in report.summary():
        console.print(f"[bold]{label}:[/] {escape(value)}", highlight=False, soft_wrap=True)
    table = Table(title=escape(str(report.path)))
    for col in ("stored as", "tensors", "params", "size", "bits/weight", "block"):
        table.add_column(col, justify="left" if col == "stored as" else "right")
    for group in report.groups:
        table.add_row(*map(escape, group.row()))
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="quanta")


if __name__ == "__main__":
    sys.exit(main())
