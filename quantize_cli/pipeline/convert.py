"""Stream a checkpoint through the plan into a quanta folder: read one tensor, quantize, write, repeat.

Peak memory is one source tensor plus its quantized form (shards are written in place at planned
offsets). The folder is built in a hidden sibling and renamed at the end; each finished shard is
recorded in a progress file there, so ``resume=True`` continues a killed run and produces the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..api import quantize
from ..errors import QuantaError
from ..format import FORMAT, FORMAT_VERSION, MAP_FILE, map_entry, state_to_tensors
from ..schemes import get_scheme
from .inspect import human_bytes
from .plan import Plan, TensorPlan, input_scale_name, linear_name, make_plan, needs_calibration
from .recipe import Recipe, build_recipe
from .smoothing import Smoothing, plan_smoothing, static_linears
from .source import PICKLE_INDEX, PICKLE_SUFFIXES, Source, SourceReader, resolve_source
from .writer import INDEX_FILE, ShardWriter, Staging, index_json, parse_size, shard_names, write_json

PROGRESS_FILE = ".quanta-progress.json"
METHOD = "naive"
# Not copied from the source folder: weights (we write our own), their indexes, and the config (rewritten).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".partial")
_SKIP_NAMES = {"config.json", INDEX_FILE, PICKLE_INDEX, MAP_FILE}
_log = logging.getLogger("quanta")

Log = Callable[[str], None]


@dataclass
class ConvertResult:
    """What a conversion wrote; sizes are tensor bytes (headers excluded)."""

    out: Path
    source: str
    revision: str | None
    recipe: dict[str, Any]
    tensors: int
    quantized: int
    params: int
    params_quantized: int
    bytes_in: int
    bytes_out: int
    bytes_quantized: int
    shards: int
    resumed_shards: int
    seconds: float
    how: str
    warnings: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight (codes + scales)."""
        return 8 * self.bytes_quantized / max(1, self.params_quantized)

    @property
    def bits_per_param(self) -> float:
        """Stored bits per parameter over the whole model, unquantized tensors included."""
        return 8 * self.bytes_out / max(1, self.params)

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) rows for the end-of-run summary."""
        resumed = f" ({self.resumed_shards} resumed)" if self.resumed_shards else ""
        ratio = self.bytes_out / max(1, self.bytes_in)
        return [
            ("recipe", f"{self.recipe['name']} (scheme {self.recipe['scheme']}, {len(self.recipe['rules'])} rule(s))"),
            (
                "quantized",
                f"{self.quantized} of {self.tensors} tensors ({self.params_quantized:,} of {self.params:,} params)",
            ),
            ("size", f"{human_bytes(self.bytes_in)} -> {human_bytes(self.bytes_out)} ({ratio:.3f}x)"),
            ("bits/weight", f"{self.bits_per_weight:.3f} quantized, {self.bits_per_param:.3f} over all params"),
            ("shards", f"{self.shards}{resumed}"),
            ("time", f"{self.seconds:.1f} s"),
        ]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise QuantaError(f"--device {device}: no CUDA device is available (use --device cpu)")
        return torch.device(device)
    raise QuantaError(f"unknown device {device!r}; valid: auto, cpu, cuda")


def convert(
    model: str,
    scheme: str | None = None,
    block_size: int | None = None,
    recipe: str | Path | None = None,
    ignore: Iterable[str] = (),
    out: str | Path | None = None,
    device: str = "auto",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    resume: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    log: Log | None = None,
    method: str | None = None,
    calibration: CalibrationInput | None = None,
) -> ConvertResult:
    """Convert ``model`` (hub id, folder or .safetensors file) into a quanta folder; see DESIGN §1, §3, §6.

    ``scheme``/``block_size``/``ignore``/``method`` build a recipe or override ``recipe`` (a YAML file). ``out``
    defaults to ``<model name>-<scheme or recipe name>`` in the working directory. ``log`` receives
    warnings (default: the ``quanta`` logger). Calibrated schemes (int8-static) and ``method="hessian"``
    read ``calibration``: a statistics file from ``quanta calibrate``, or data to calibrate on first; its
    ``smooth`` folds the SmoothQuant factors of the statistics into the weights of W8A8 Linears.
    """
    log = log or _log.warning
    started = time.perf_counter()
    used = build_recipe(recipe, scheme, block_size, tuple(ignore), method)
    dev = resolve_device(device)
    max_bytes = parse_size(max_shard_size)
    source = resolve_source(model, revision, allow_pickle)
    if source.config and source.config.get("quantization_config"):
        method = source.config["quantization_config"].get("quant_method", "?")
        raise QuantaError(f"{model} is already quantized (quant_method {method}); convert a full-precision model")
    staging = Staging(Path(out) if out is not None else Path.cwd() / f"{source.name}-{used.name}")
    staging.check_target(overwrite)
    plan = make_plan(source, used, max_bytes)
    for w in plan.warnings:
        log(w)
    given = calibration or CalibrationInput()
    with _calibration_stats(plan, given, source, staging, progress, log) as stats:
        smoothing = plan_smoothing(plan, stats, given.smooth, log)
        fingerprint = _fingerprint(source, used, plan, max_bytes, stats, smoothing)
        done = _prepare(staging, fingerprint, resume, log)
        result = _run(plan, source, used, staging, dev, done, fingerprint, progress, stats, smoothing)
    return _result(staging.target, source, used, plan, result, time.perf_counter() - started)


def _run(
    plan: Plan,
    source: Source,
    used: Recipe,
    staging: Staging,
    dev: torch.device,
    done: dict[str, Any],
    fingerprint: str,
    progress: bool,
    stats: Any,
    smoothing: Smoothing | None = None,
) -> int:
    """Write the shards and the side files into the staging folder and publish it; returns shards resumed."""
    try:
        resumed = len(done)
        _write_shards(plan, source, staging.tmp, dev, done, fingerprint, progress, stats, smoothing)
        _finish(staging.tmp, source, used, plan, done, smoothing)
        staging.publish()
    except KeyboardInterrupt:
        raise QuantaError(
            f"interrupted; finished shards are kept in {staging.tmp}: run the same command with --resume to continue"
        ) from None
    except BaseException:
        staging.discard()
        raise
    return resumed


@dataclass
class CalibrationInput:
    """Where calibration statistics come from: an existing ``file``, or ``data`` to calibrate on now.

    ``smooth`` (W8A8 only): ``"auto"`` folds the file's SmoothQuant smoothing (calibrating now, alpha is
    searched per group), an alpha in [0, 1] requires (or calibrates with) that alpha, ``"off"`` folds nothing.
    """

    file: str | Path | None = None
    data: str | None = None
    samples: int = 128
    seq_len: int = 512
    smooth: str | float | None = "auto"


@contextmanager
def _calibration_stats(
    plan: Plan, given: CalibrationInput, source: Source, staging: Staging, progress: bool, log: Log
) -> Iterator[Any]:
    """The CalibrationStats the plan needs (None if it needs none), checked against every planned tensor."""
    from ..calibration import CalibrationStats, calibrate  # noqa: PLC0415 - calibration imports the pipeline

    wanted = [tp for tp in plan.quantized if needs_calibration(tp.target)]
    if not wanted:
        if given.file is not None or given.data is not None:
            log("calibration given, but no planned tensor uses it (int8-static or --method hessian do)")
        yield None
        return
    if given.file is None and given.data is None:
        first = wanted[0]
        raise QuantaError(
            f"{first.name} ({first.target.scheme}, method {first.target.kwargs.get('method', 'naive')}) needs "
            "calibration data: pass --calibration FILE from `quanta calibrate`, or --data to calibrate now"
        )
    scratch = None
    if given.file is None:
        scratch = staging.target.with_name(f".{staging.target.name}.quanta-calib.safetensors")
        calibrate(source.model, given.data, scratch, given.samples, given.seq_len, _settings(plan, given),
                  overwrite=True, show_progress=progress)  # fmt: skip
    try:
        stats = CalibrationStats(scratch or given.file)
        missing = [tp.name for tp in wanted if linear_name(tp.name) not in stats.linears]
        if missing:
            raise QuantaError(f"calibration file {stats.path} has no statistics for {missing[0]}")
        yield stats
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)


def _settings(plan: Plan, given: CalibrationInput) -> Any:
    """Calibration settings for calibrating during a conversion. For W8A8 Linears: smoothing as asked, and
    the MSE-optimal (histogram) activation clip, which static int8 activations need far more than a
    min-max range (SmolLM2-135M perplexity: README)."""
    from ..algorithms import parse_smooth  # noqa: PLC0415
    from ..calibration import CalibrationSettings  # noqa: PLC0415

    hessian = any(tp.target.kwargs.get("method") == "hessian" for tp in plan.quantized)
    if not static_linears(plan):
        return CalibrationSettings(hessian=hessian)
    return CalibrationSettings(observer="histogram", hessian=hessian, smooth=parse_smooth(given.smooth))


def _fingerprint(
    source: Source, recipe: Recipe, plan: Plan, max_bytes: int, stats: Any = None, smoothing: Smoothing | None = None
) -> str:
    """A hash of everything that decides the output bytes: source files, recipe, plan, shard budget."""
    from .. import __version__

    key = [
        __version__,
        source.model,
        source.revision,
        source.fingerprint(),
        recipe.to_dict(),
        plan.describe(),
        max_bytes,
        None if stats is None else stats.metadata,  # settings, data, samples: what decided the statistics
        None if smoothing is None else smoothing.record,
    ]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()


def _prepare(staging: Staging, fingerprint: str, resume: bool, log: Log) -> dict[str, Any]:
    """Create the staging folder; with ``resume``, return the finished shards recorded there."""
    progress_path = staging.tmp / PROGRESS_FILE
    if staging.tmp.exists() and resume and progress_path.is_file():
        record = json.loads(progress_path.read_text())
        if record.get("fingerprint") != fingerprint:
            raise QuantaError(
                f"cannot resume: {staging.tmp} holds an unfinished run of another model, recipe or shard size; "
                "run without --resume to start over"
            )
        done = {name: info for name, info in record["done"].items() if _shard_intact(staging.tmp / name, info)}
        log(f"resuming: {len(done)} finished shard(s) found in {staging.tmp}")
        return done
    if staging.tmp.exists():
        log(f"discarding an unfinished earlier run in {staging.tmp}" + ("" if resume else " (--resume continues one)"))
        shutil.rmtree(staging.tmp)
    elif resume:
        log(f"nothing to resume in {staging.tmp}; starting from the beginning")
    staging.tmp.mkdir()
    write_json(progress_path, {"fingerprint": fingerprint, "done": {}})
    return {}


def _shard_intact(path: Path, info: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == info["size"]


def _progress(enabled: bool) -> Progress:
    """Tensors, bytes, rate, ETA on stderr; only on a terminal (in logs it would be noise)."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tensors]} tensors"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,  # the summary replaces the bar; an error stays the only line on stderr
    )


def _write_shards(
    plan: Plan,
    source: Source,
    tmp: Path,
    dev: torch.device,
    done: dict[str, Any],
    fingerprint: str,
    show: bool,
    stats: Any = None,
    smoothing: Smoothing | None = None,
) -> None:
    """Write every shard not in ``done``, recording each in the progress file as it completes."""
    names = shard_names(len(plan.shards))
    total = sum(tp.info.nbytes for tp in plan.tensors.values())
    stop_after = int(os.environ.get("QUANTA_TEST_STOP_AFTER_SHARDS", "0"))  # tests: simulate a kill
    with _progress(show) as bar, SourceReader(source) as reader:
        task = bar.add_task("converting", total=total, tensors=f"0/{len(plan.tensors)}")
        count = 0
        for k, shard in enumerate(plan.shards):
            if names[k] in done:
                count += len(shard)
                bar.update(
                    task,
                    advance=sum(plan.tensors[n].info.nbytes for n in shard),
                    tensors=f"{count}/{len(plan.tensors)}",
                )
                continue
            entries: dict[str, Any] = {}
            with ShardWriter(tmp / names[k], plan.shard_specs(k)) as writer:
                for name in shard:
                    tp = plan.tensors[name]
                    tensors, entry = _convert_tensor(tp, reader.get(name), dev, stats, smoothing)
                    for out_name, t in tensors.items():
                        writer.write(out_name, t)
                    if entry is not None:
                        entries[name] = entry
                    count += 1
                    bar.update(task, advance=tp.info.nbytes, tensors=f"{count}/{len(plan.tensors)}")
            done[names[k]] = {"size": (tmp / names[k]).stat().st_size, "entries": entries}
            write_json(tmp / PROGRESS_FILE, {"fingerprint": fingerprint, "done": done})
            if stop_after and len(done) >= stop_after:
                os.kill(os.getpid(), signal.SIGKILL)


def _convert_tensor(
    tp: TensorPlan, tensor: torch.Tensor, dev: torch.device, stats: Any = None, smoothing: Smoothing | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(output tensors on the CPU, map entry or None) for one source tensor.

    ``stats`` (CalibrationStats) supplies X^T X for ``method="hessian"`` and the static activation scale
    of calibrated schemes, written as ``P.input_scale``. ``smoothing`` scales the tensor first when it folds
    into it; a smoothed Linear's input scale is that of its smoothed input.
    """
    smoothed = smoothing is not None and linear_name(tp.name) in smoothing.alphas
    if smoothing is not None:
        tensor = smoothing.apply(tp.name, tensor)
    if tp.target is None:
        return {tp.name: tensor}, None
    t = tp.target
    options = dict(t.kwargs)
    if options.get("method") == "hessian":
        options["hessian"] = stats.hessian(linear_name(tp.name)).to(dev)
    try:
        state = quantize(tensor.to(dev), t.scheme, t.block_size, backend="auto", **options)
    except ValueError as exc:
        raise QuantaError(f"cannot quantize tensor {tp.name} ({tp.info.file.name}): {exc}") from None
    tensors = {k: v.to("cpu") for k, v in state_to_tensors(tp.name, state).items()}
    extra = {k: v for k, v in t.kwargs.items() if k != "method"}  # the scheme option is the map's "method"
    if get_scheme(t.scheme).needs_calibration:
        scale_name = input_scale_name(tp.name)
        tensors[scale_name] = stats.input_scale(linear_name(tp.name), smoothed=smoothed).float()
        extra["input_scale"] = scale_name
        if smoothed:
            extra["smoothing_alpha"] = smoothing.alphas[linear_name(tp.name)]
    return tensors, map_entry(state, t.kwargs.get("method", METHOD), **extra)


def _quantization_map(
    source: Source, recipe: Recipe, entries: dict[str, Any], smoothing: Smoothing | None = None
) -> dict[str, Any]:
    from .. import __version__

    params = sum(math.prod(t.shape) for t in source.tensors.values())
    qmap = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quanta_version": __version__,
        "source": {"model": source.model, "revision": source.revision, "bytes": source.nbytes, "params": params},
        "recipe": recipe.to_dict(),
        "tensors": dict(sorted(entries.items())),
    }
    if smoothing is not None:  # folded into the stored tensors: a record of what was done, not needed to load
        qmap["smoothing"] = smoothing.record
    return qmap


def _finish(
    tmp: Path, source: Source, recipe: Recipe, plan: Plan, done: dict[str, Any], smoothing: Smoothing | None = None
) -> None:
    """Index, quantization map, config with ``quantization_config``, copied tokenizer/config files."""
    if len(plan.shards) > 1:
        outputs = [list(plan.shard_specs(k)) for k in range(len(plan.shards))]
        write_json(tmp / INDEX_FILE, index_json(outputs, plan.specs))
    entries = {n: e for info in done.values() for n, e in info["entries"].items()}
    write_json(tmp / MAP_FILE, _quantization_map(source, recipe, entries, smoothing))
    if source.root is not None:
        _copy_side_files(source.root, tmp)
    if source.config is not None:
        from .. import __version__

        config = dict(source.config)
        config["quantization_config"] = {
            "quant_method": FORMAT,
            "format_version": FORMAT_VERSION,
            "map": MAP_FILE,
            "quanta_version": __version__,
            "scheme": recipe.scheme,
        }
        write_json(tmp / "config.json", config)
    (tmp / PROGRESS_FILE).unlink()


def _copy_side_files(root: Path, dest: Path) -> None:
    """Copy tokenizer files, generation config, chat template etc. unchanged (weights and hidden files skipped)."""
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if src.suffix in _SKIP_SUFFIXES + PICKLE_SUFFIXES or (len(rel.parts) == 1 and src.name in _SKIP_NAMES):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)


def _result(out: Path, source: Source, recipe: Recipe, plan: Plan, resumed: int, seconds: float) -> ConvertResult:
    quantized = plan.quantized
    return ConvertResult(
        out=out,
        source=source.model,
        revision=source.revision,
        recipe=recipe.to_dict(),
        tensors=len(plan.tensors),
        quantized=len(quantized),
        params=sum(math.prod(tp.info.shape) for tp in plan.tensors.values()),
        params_quantized=sum(math.prod(tp.info.shape) for tp in quantized),
        bytes_in=source.nbytes,
        bytes_out=sum(tp.nbytes_out for tp in plan.tensors.values()),
        bytes_quantized=sum(tp.nbytes_out for tp in quantized),
        shards=len(plan.shards),
        resumed_shards=resumed,
        seconds=seconds,
        how=plan.how,
        warnings=plan.warnings,
    )
