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
DataOpt = Annotated[
    str,
    typer.Option("--data", help="Named data set (wikitext, c4, pile) or a local .txt/.jsonl/.parquet file or folder."),
]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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


def _not_implemented(command: str) -> None:
    _fail(f"`quanta {command}` is not implemented yet")


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
            str(s.default_block_size or "-"),
            "yes" if s.needs_calibration else "no",
            "yes" if triton_ok else "no",
            s.description,
        )
    console.print(table)


@app.command()
@handle_errors
def convert(
    model: ModelArg,
    scheme: SchemeOpt = "nf4",
    block_size: BlockOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder (default: <model>-<scheme>).")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Stream MODEL tensor by tensor through a scheme into a quantized safetensors folder."""
    _not_implemented("convert")


@app.command()
@handle_errors
def calibrate(
    model: ModelArg,
    data: DataOpt = "wikitext",
    samples: Annotated[int, typer.Option("--samples", help="Number of calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.")] = 512,
    out: Annotated[str, typer.Option("--out", "-o", help="Calibration statistics file.")] = "calib.safetensors",
) -> None:
    """Run calibration data through MODEL one decoder layer at a time and save the statistics."""
    _not_implemented("calibrate")


@app.command("eval")
@handle_errors
def eval_(
    model: ModelArg,
    ppl: Annotated[bool, typer.Option("--ppl", help="Measure perplexity.")] = False,
    data: DataOpt = "wikitext",
) -> None:
    """Evaluate a model or a quanta folder: perplexity, KL divergence, per-tensor error metrics."""
    _not_implemented("eval")


@app.command()
@handle_errors
def reload(
    path: DirArg,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Generate greedily from this prompt.")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Load a quanta folder into a transformers model with packed quantized Linear modules."""
    _not_implemented("reload")


@app.command()
@handle_errors
def inspect(path: DirArg) -> None:
    """Summarise a quanta folder: tensors by scheme, bits per weight, size against the source."""
    _not_implemented("inspect")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="quanta")


if __name__ == "__main__":
    sys.exit(main())
