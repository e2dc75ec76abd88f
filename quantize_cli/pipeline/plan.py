"""The plan: for every tensor of the checkpoint, the scheme (or None) and the exact tensors it becomes.

Everything here works from headers only. The plan is complete and validated before any weight is read:
scheme and block per tensor, the name/dtype/shape of every output tensor, and the shard each lands in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..api import check_block_size, quantize
from ..errors import QuantaError
from ..format import state_to_tensors
from ..schemes import get_scheme
from .recipe import Recipe
from .source import Source, TensorInfo
from .writer import TensorSpec, split_shards

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Name-based fallback when no model can be built: these 2-D weights are not Linear layers of blocks.
_NOT_LINEAR = re.compile(r"(embed|lm_head|norm|wte|wpe|ln_f|\bln_\d|\.ln\d?\.)", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """How one tensor is quantized: scheme, resolved block size, scheme options."""

    scheme: str
    block_size: int | None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class TensorPlan:
    """One source tensor: its target (None: copied as is) and the tensors it is written as."""

    info: TensorInfo
    target: Target | None
    outputs: dict[str, TensorSpec]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def nbytes_out(self) -> int:
        return sum(s.nbytes for s in self.outputs.values())


@dataclass
class Plan:
    """Every tensor in reading order, the source tensors of each shard, and warnings for the user."""

    tensors: dict[str, TensorPlan]
    shards: list[list[str]]
    how: str
    warnings: list[str] = field(default_factory=list)

    def shard_specs(self, k: int) -> dict[str, TensorSpec]:
        """Output name -> spec for every tensor written into shard ``k``."""
        return {o: s for name in self.shards[k] for o, s in self.tensors[name].outputs.items()}

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {o: s for tp in self.tensors.values() for o, s in tp.outputs.items()}

    @property
    def quantized(self) -> list[TensorPlan]:
        return [tp for tp in self.tensors.values() if tp.target is not None]

    def describe(self) -> list[list[Any]]:
        """JSON-able (name, scheme, block, options) per tensor plus the shard grouping: the resume key."""
        rows: list[list[Any]] = []
        for tp in self.tensors.values():
            t = tp.target
            rows.append([tp.name, t.scheme if t else None, t.block_size if t else None, list(t.options) if t else []])
        return [rows, self.shards]


def quantizable(info: TensorInfo) -> bool:
    """Only 2-D floating-point tensors are quantized (a Linear weight, an embedding table)."""
    return len(info.shape) == 2 and info.dtype in FLOAT_DTYPES and math.prod(info.shape) > 0


def default_targets(source: Source, targets: str) -> tuple[set[str], str]:
    """(names quantized by default, how they were chosen) for ``targets`` = linear | all-2d."""
    candidates = {n for n, info in source.tensors.items() if quantizable(info)}
    if targets == "all-2d":
        return candidates, "every 2-D floating-point tensor"
    linear = _block_linear_weights(source.root, candidates) if source.config is not None else None
    if linear is not None:
        return linear, "Linear layers inside the model's blocks (model built on the meta device from config.json)"
    by_name = {n for n in candidates if n.endswith(".weight") and not _NOT_LINEAR.search(n)}
    return by_name, "2-D *.weight tensors not named like embeddings, lm_head or norms (no usable config.json)"


def _meta_model(config: Any) -> torch.nn.Module:
    """The model ``config`` describes, built with empty (meta) weights: no memory, nothing read."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with init_empty_weights():
        for arch in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls(config)
        auto = AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
        return auto.from_config(config)


def _block_linear_weights(root: Path | None, candidates: set[str]) -> set[str] | None:
    """Checkpoint names of ``nn.Linear`` weights under an ``nn.ModuleList`` (the repeated blocks).

    The model is built on the meta device from ``config.json`` (no memory, no weights read,
    ``trust_remote_code`` off). None when transformers cannot build it.
    """
    try:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = _meta_model(AutoConfig.from_pretrained(root, trust_remote_code=False))
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # any failure to build means: decide by names instead
        return None
    lists = {n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    linear = set()
    for n, m in model.named_modules():
        parts = n.split(".")
        if isinstance(m, torch.nn.Linear) and any(".".join(parts[:i]) in lists for i in range(1, len(parts))):
            linear.add(f"{n}.weight")
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    # Checkpoints saved from the base model lack the prefix, those from a head model have it.
    return {c for c in candidates if c in linear or prefix + c in linear or c.removeprefix(prefix) in linear}


def _target_for(info: TensorInfo, recipe: Recipe, defaults: set[str], hits: dict[str, int]) -> Target | None:
    """The first of: ignore -> None, first matching rule, default scheme for default targets, None."""
    for p in recipe.ignore:
        if p.matches(info.name):
            hits[f"ignore {p.text!r}"] += 1
            return None
    for i, rule in enumerate(recipe.rules):
        if not rule.match.matches(info.name):
            continue
        if not quantizable(info):
            if rule.match.literal:
                raise QuantaError(
                    f"rule {i + 1} (match {rule.match.text!r}) names {info.name}, a {len(info.shape)}-D "
                    f"{info.dtype} tensor; only 2-D floating-point weights can be quantized"
                )
            continue
        hits[f"rule {i + 1} (match {rule.match.text!r})"] += 1
        if rule.scheme is None:
            return None
        block = check_block_size(get_scheme(rule.scheme), rule.block_size)
        return Target(rule.scheme, block, tuple(sorted(rule.options.items())))
    if info.name in defaults and recipe.scheme is not None:
        block = check_block_size(get_scheme(recipe.scheme), recipe.block_size)
        return Target(recipe.scheme, block, tuple(sorted(recipe.options.items())))
    return None


@lru_cache(maxsize=256)
def _layout(target: Target, cols: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...], bool]]:
    """Output suffix -> (dtype, shape for 1 row, whether dim 0 grows with rows), from quantizing 1 and 2 rows.

    Asking the scheme itself keeps this free of per-scheme layout rules.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cols, generator=g).to(dtype)
    kwargs = {k: v for k, v in target.kwargs.items() if k != "method"}  # the layout does not depend on it
    one = state_to_tensors("", quantize(x[:1], target.scheme, target.block_size, backend="reference", **kwargs))
    two = state_to_tensors("", quantize(x, target.scheme, target.block_size, backend="reference", **kwargs))
    out = {}
    for suffix, t1 in one.items():
        t2 = two[suffix]
        grows = t1.dim() > 0 and t1.shape[0] == 1 and t2.shape[0] == 2 and t1.shape[1:] == t2.shape[1:]
        if not grows and t1.shape != t2.shape:
            raise QuantaError(f"internal error: scheme {target.scheme} output {suffix!r} has an unpredictable shape")
        out[suffix] = (t1.dtype, tuple(t1.shape), grows)
    return out


def _outputs(info: TensorInfo, target: Target | None) -> dict[str, TensorSpec]:
    if target is None:
        return {info.name: TensorSpec(info.dtype, info.shape)}
    try:
        layout = _layout(target, info.shape[-1], info.dtype)
    except QuantaError:
        raise
    except Exception as exc:  # a scheme refusing these options/shape: report it against the tensor
        raise QuantaError(f"cannot quantize {info.name} with {target.scheme}: {exc}") from None
    rows = info.shape[0]
    outputs = {
        info.name + sfx: TensorSpec(dt, (rows, *shape[1:]) if grows else shape)
        for sfx, (dt, shape, grows) in layout.items()
    }
    if get_scheme(target.scheme).needs_calibration:
        outputs[input_scale_name(info.name)] = TensorSpec(torch.float32, ())
    return outputs


def needs_calibration(target: Target | None) -> bool:
    """Whether ``target`` reads calibration statistics: a calibrated scheme, or the Hessian method."""
    return target is not None and (
        get_scheme(target.scheme).needs_calibration or target.kwargs.get("method") == "hessian"
    )


def linear_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj`` (the module calibration saw)."""
    return weight_name.removesuffix(".weight")


def input_scale_name(weight_name: str) -> str:
    """Where a static activation scale is stored: ``P.input_scale`` next to ``P.weight``."""
    return linear_name(weight_name) + ".input_scale"


def make_plan(source: Source, recipe: Recipe, max_shard_bytes: int) -> Plan:
    """Decide every tensor's fate and output layout from headers alone; raise on anything invalid."""
    defaults, how = default_targets(source, recipe.targets)
    hits: dict[str, int] = {f"ignore {p.text!r}": 0 for p in recipe.ignore}
    hits.update({f"rule {i + 1} (match {r.match.text!r})": 0 for i, r in enumerate(recipe.rules)})
    tensors: dict[str, TensorPlan] = {}
    seen: set[str] = set()
    for info in source.tensors.values():
        target = _target_for(info, recipe, defaults, hits)
        tp = TensorPlan(info, target, _outputs(info, target))
        clash = seen.intersection(tp.outputs) | (set(tp.outputs) - {info.name}).intersection(source.tensors)
        if clash:
            raise QuantaError(
                f"quantizing {info.name} would write {sorted(clash)[0]}, which the checkpoint already has"
            )
        seen.update(tp.outputs)
        tensors[info.name] = tp
    warnings = [f"{what} matches no 2-D floating-point weight" for what, n in hits.items() if n == 0]
    if not any(tp.target for tp in tensors.values()):
        warnings.append("the plan quantizes no tensor: the output is a copy of the input")
    shards = split_shards(((n, tp.nbytes_out) for n, tp in tensors.items()), max_shard_bytes)
    return Plan(tensors, shards, how, warnings)
