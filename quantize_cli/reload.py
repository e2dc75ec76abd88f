"""Load a quanta folder (DESIGN §3) back into a transformers model whose quantized Linears stay packed.

``load_quantized`` builds the model on the meta device from ``config.json``, puts a ``QuantLinear``
wherever ``quantization_map.json`` names a quantized Linear weight, and streams the shards in with
``load_state_dict(..., assign=True)``: tensors go from the file to their module as stored, so no
full-precision copy of a quantized weight is ever made. ``dequantize_folder`` writes the float HF
folder the quantized one stands for.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .api import dequantize
from .errors import QuantaError
from .format import FORMAT, MAP_FILE, folder_of, read_map, stored_names, tensors_to_state
from .nn import QuantLinear
from .schemes import QuantState, get_scheme
from .schemes.base import parse_dtype

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# -- reading a folder ------------------------------------------------------------------------------------
def shard_index(folder: Path) -> dict[str, Path]:
    """Every stored tensor name -> the shard file holding it (from the index json, or the single file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise QuantaError(f"{index} is not a valid safetensors index: {exc!r}") from None
        files = {file: folder / file for file in set(weight_map.values())}
        for file in files.values():
            if not file.is_file():
                raise QuantaError(f"missing shard {file} (listed in {INDEX_FILE})")
        return {key: files[file] for key, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise QuantaError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with _open_shard(single, "cpu") as f:
        return dict.fromkeys(f.keys(), single)


@contextlib.contextmanager
def _open_shard(file: Path, device: str) -> Iterator[Any]:
    """``safe_open`` whose failures (truncated, corrupt, unreadable file) become one QuantaError naming it."""
    try:
        with safe_open(str(file), framework="pt", device=device) as handle:
            yield _CheckedShard(handle, file)
    except (SafetensorError, OSError) as exc:
        raise QuantaError(f"corrupt or truncated shard {file}: {str(exc).splitlines()[0]}") from None


class _CheckedShard:
    """A safetensors handle whose reads name the file when they fail."""

    def __init__(self, handle: Any, file: Path) -> None:
        self._handle, self._file = handle, file

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise QuantaError(f"corrupt or truncated shard {self._file}: {key}: {str(exc).splitlines()[0]}") from None


def _by_file(index: dict[str, Path]) -> dict[Path, list[str]]:
    files: dict[Path, list[str]] = {}
    for key, file in index.items():
        files.setdefault(file, []).append(key)
    return files


def _check_quantized_present(qmap: dict[str, Any], index: dict[str, Path], folder: Path) -> None:
    for name in qmap["tensors"]:
        if name not in index:
            raise QuantaError(f"missing tensor {name} in {folder} (the map lists it as quantized)")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


# -- building the model ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is a QuantaError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QuantaError(f"unknown device {device!r}; valid: auto, cpu, cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantaError("device cuda requested but CUDA is not available")
    return dev


def _load_config(folder: Path) -> Any:
    """The folder's config without its ``quantization_config``, so transformers builds a plain model."""
    from transformers import AutoConfig  # noqa: PLC0415 - heavy import, only needed here

    if not (folder / "config.json").is_file():
        raise QuantaError(f"no config.json in {folder}")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
        if method != FORMAT:
            raise QuantaError(f"{folder} is quantized with {method!r}, not {FORMAT!r}")
        # transformers would look for a quantizer named "quanta" and refuse; we are that quantizer.
        del config.quantization_config
    return config


def _is_causal_lm(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(arch in causal or arch.endswith("ForCausalLM") for arch in config.architectures or [])


def _skeleton(config: Any) -> nn.Module:
    """The model on the meta device: parameters take no memory; buffers (rotary tables) are real."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from transformers import AutoModel, AutoModelForCausalLM  # noqa: PLC0415

    auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config, trust_remote_code=False)


def _renamer(stored: list[str], model_keys: set[str], prefix: str) -> Callable[[str], str]:
    """Map stored names to the model's: as they are, with or without ``base_model_prefix`` (whichever fits)."""
    dot = prefix + "." if prefix else ""
    candidates: list[Callable[[str], str]] = [lambda k: k]
    if dot:
        candidates += [lambda k: dot + k, lambda k: k[len(dot) :] if k.startswith(dot) else k]
    return max(candidates, key=lambda fn: sum(fn(k) in model_keys for k in stored))


def _place_quantized(
    model: nn.Module, qmap: dict[str, Any], rename: Callable[[str], str], dtype: torch.dtype | None, stored: set[str]
) -> dict[str, str]:
    """Put a ``QuantLinear`` wherever the map quantizes a Linear weight.

    Returns {stored name: model name} of the quantized tensors that have no Linear to live in (an
    embedding a recipe quantized, ...): those are dequantized at load.
    """
    elsewhere: dict[str, str] = {}
    model_keys = set(model.state_dict())
    for name, entry in qmap["tensors"].items():
        target = rename(name)
        if target not in model_keys:
            raise QuantaError(f"quantized tensor {name} has no place in {type(model).__name__}")
        path, _, leaf = target.rpartition(".")
        module = model.get_submodule(path)
        if leaf != "weight" or not isinstance(module, nn.Linear):
            elsewhere[name] = target
            continue
        shape = [module.out_features, module.in_features]
        if list(entry["shape"]) != shape:
            raise QuantaError(f"{name} has shape {entry['shape']} in the map but the model expects {shape}")
        spec = get_scheme(entry["scheme"])
        # "method" records how the scales were chosen; the stored codes already embody it.
        options = {
            k: v for k, v in entry.items() if k in spec.options and k != "method" and isinstance(v, bool | int | str)
        }
        block = None if spec.per_row else entry["block_size"]
        quant = QuantLinear(
            module.in_features, module.out_features, module.bias is not None, spec.name, block,
            compute_dtype=dtype, device="meta", dtype=parse_dtype(entry["dtype"]),
            static_input=_input_scale_key(name) in stored, **options,
        )  # fmt: skip
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, quant)
    return elsewhere


def _input_scale_key(name: str) -> str:
    """Where the static activation scale of the quantized ``P.weight`` is stored: ``P.input_scale``."""
    return name.removesuffix("weight") + "input_scale"


def _packed_keys(quantized: dict[str, Any], stored: set[str]) -> set[str]:
    """Stored names that make up quantized tensors: codes, scales, zero points, static input scales."""
    parts = {part for name in quantized for part in stored_names(name, stored)}
    return parts | ({_input_scale_key(name) for name in quantized} & stored)


def _untie_quantized_head(model: Any) -> None:
    # A packed lm_head cannot share the embedding's float weight: keep the two apart.
    if isinstance(model.get_output_embeddings(), QuantLinear):
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False


def _tie(model: Any, missing: set[str]) -> None:
    if "missing_keys" in inspect.signature(model.tie_weights).parameters:
        model.tie_weights(missing_keys=missing)  # transformers 5: ties towards whichever side was stored
    else:
        model.tie_weights()


# -- loading --------------------------------------------------------------------------------------------
def load_quantized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, progress: bool = False
) -> nn.Module:
    """Load the quanta folder ``path`` as a transformers model, quantized Linears packed in ``QuantLinear``.

    ``AutoModelForCausalLM`` when ``config.architectures`` names a causal LM, else ``AutoModel``.
    ``device``: ``cpu``, ``cuda`` or ``auto``; tensors are read straight onto it, shard by shard.
    ``dtype=None`` keeps the checkpoint's dtypes; a dtype casts the float parameters and becomes the
    compute dtype of the dequantized weights. Returns the model in eval mode.
    """
    folder = folder_of(path)
    qmap = read_map(folder)
    dev = resolve_device(device)
    index = shard_index(folder)
    _check_quantized_present(qmap, index, folder)
    model: Any = _skeleton(_load_config(folder))
    rename = _renamer(list(index), set(model.state_dict()), getattr(model, "base_model_prefix", ""))
    elsewhere = _place_quantized(model, qmap, rename, dtype, set(index))
    _untie_quantized_head(model)
    model_keys = set(model.state_dict())
    loaded = _stream_shards(model, folder, qmap, index, rename, model_keys, elsewhere, dev, dtype, progress)
    _tie(model, model_keys - loaded)
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QuantaError(f"missing tensor {missing[0]} in {folder}{more}")
    if dtype is not None:
        model.config.dtype = dtype
    generation = folder / "generation_config.json"
    if generation.is_file() and model.can_generate():
        from transformers import GenerationConfig  # noqa: PLC0415

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(dev).eval()


def _stream_shards(
    model: nn.Module,
    folder: Path,
    qmap: dict[str, Any],
    index: dict[str, Path],
    rename: Callable[[str], str],
    model_keys: set[str],
    elsewhere: dict[str, str],
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
) -> set[str]:
    """Read each shard once and ``load_state_dict(assign=True)`` its tensors; returns the model keys loaded."""
    stored = set(index)
    packed = _packed_keys(qmap["tensors"], stored)
    # Stored names that belong to a weight dequantized at load, and the weight they belong to.
    parts_of = {part: name for name in elsewhere for part in stored_names(name, stored)}
    loaded: set[str] = set()
    files = _by_file(index)
    with _progress(progress) as bar:
        task = bar.add_task(f"loading {folder.name}", total=len(index))
        for file, keys in files.items():
            batch: dict[str, torch.Tensor] = {}
            with _open_shard(file, str(device)) as shard:
                for key in keys:
                    bar.advance(task)
                    if key in parts_of:
                        continue
                    target = rename(key)
                    if target not in model_keys:
                        continue  # stored but unused by this model class (a head, a legacy buffer)
                    tensor = shard.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point() and key not in packed:
                        tensor = tensor.to(dtype)
                    batch[target] = tensor
            for name in {parts_of[k] for k in keys if k in parts_of}:
                log.warning("%s is quantized but is no Linear weight: dequantized at load", name)
                state = _read_state(name, qmap["tensors"][name], index)
                batch[elsewhere[name]] = dequantize(state, dtype=dtype).to(device)
            _assign(model, batch, file)
            loaded |= set(batch)
    return loaded


def _read_state(name: str, entry: dict[str, Any], index: dict[str, Path]) -> QuantState:
    """The ``QuantState`` of the quantized ``name``, its parts read from whichever shards hold them."""

    def get(key: str) -> torch.Tensor | None:
        if key not in index:
            return None
        with _open_shard(index[key], "cpu") as shard:
            return shard.get_tensor(key)

    return tensors_to_state(name, entry, get)


def _assign(model: nn.Module, batch: dict[str, torch.Tensor], file: Path) -> None:
    try:
        model.load_state_dict(batch, strict=False, assign=True)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise QuantaError(f"{file.name}: {details[0] if details else exc}") from None


# -- reporting and generating ---------------------------------------------------------------------------
def summarize(model: nn.Module) -> str:
    """One paragraph: model class, QuantLinear count by scheme, packed bytes against their float size."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    schemes = Counter(m.scheme for m in quant)
    packed = sum(t.numel() * t.element_size() for m in quant for t in m.buffers())
    as_float = sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in quant)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    by_scheme = ", ".join(f"{n} {s}" for s, n in schemes.most_common()) or "none"
    first = next(iter(tensors.values()), None)
    where = f" on {first.device}" if first is not None else ""
    return (
        f"{type(model).__name__}{where}: {len(quant)} QuantLinear ({by_scheme}); quantized weights "
        f"{_mb(packed)} packed against {_mb(as_float)} unquantized ({_ratio(as_float, packed)}); "
        f"whole model {_mb(total)} in memory."
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x smaller" if b else "-"


def generate(model: Any, path: str | Path, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy continuation of ``prompt`` (through the tokenizer's chat template when it has one)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    if not model.can_generate():
        raise QuantaError(f"--prompt needs a causal LM; {path} holds a {type(model).__name__}")
    if max_new_tokens < 1:
        raise QuantaError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    config = model.generation_config
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# -- dequantizing a folder ------------------------------------------------------------------------------
def dequantize_folder(path: str | Path, out: str | Path, progress: bool = False) -> Path:
    """Write the float HF folder ``out`` that the quanta folder ``path`` stands for; returns ``out``.

    Each quantized ``P.weight`` becomes ``dequantize`` of its codes, in the dtype the map records (a static
    activation scale ``P.input_scale`` is dropped); every other tensor and file is copied, and
    ``config.json`` loses its ``quantization_config``. Shard by
    shard (same file names); built in a temporary folder next to ``out`` and renamed at the end, so a
    failure leaves nothing behind. ``out`` must not exist.
    """
    folder = folder_of(path)
    qmap = read_map(folder)
    index = shard_index(folder)
    _check_quantized_present(qmap, index, folder)
    target = Path(out)
    if target.exists():
        raise QuantaError(f"{target} already exists; choose another folder or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        weight_map, total = _write_float_shards(folder, qmap, index, staging, progress)
        _copy_side_files(folder, staging, weight_map, total)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_float_shards(
    folder: Path, qmap: dict[str, Any], index: dict[str, Path], staging: Path, progress: bool
) -> tuple[dict[str, str], int]:
    """Dequantize shard by shard into ``staging``; returns the weight map {tensor: file name} and total bytes."""
    quantized = qmap["tensors"]
    # Static activation scales go too: the float model runs float activations.
    packed = _packed_keys(quantized, set(index))
    weight_map: dict[str, str] = {}
    total = 0
    with _progress(progress) as bar:
        task = bar.add_task(f"dequantizing {folder.name}", total=len(index))
        for file, keys in _by_file(index).items():
            tensors: dict[str, torch.Tensor] = {}
            with _open_shard(file, "cpu") as shard:
                for key in keys:
                    bar.advance(task)
                    if key not in packed:
                        tensors[key] = shard.get_tensor(key)
            for name in [k for k in keys if k in quantized]:
                tensors[name] = dequantize(_read_state(name, quantized[name], index)).contiguous()
            save_file(tensors, str(staging / file.name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file.name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
    return weight_map, total


def _copy_side_files(folder: Path, staging: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Config without quantization_config, a rebuilt index, and every other file as it is."""
    skip = {MAP_FILE, INDEX_FILE, "config.json", *set(weight_map.values())}
    for item in folder.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (folder / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["dequantize_folder", "generate", "load_quantized", "read_map", "summarize"]
