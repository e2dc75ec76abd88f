"""Run calibration data through a checkpoint one decoder layer at a time.

The model is built on the meta device from its config (buffers such as rotary frequencies stay real).
Only the input embeddings and the current decoder layer are ever materialised from the checkpoint:
the embeddings turn the token windows into layer 0's inputs, stand-ins for the layers record the other
arguments the model passes each of them (attention mask, position embeddings...: they differ between
layers where sliding-window and full attention alternate, as in Gemma 2 and 3), then each layer is
loaded, run on every window with its own arguments, observed, and released, its outputs becoming the
next layer's inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from ..algorithms import SmoothGroup, smoothing_groups
from ..errors import QuantaError
from ..pipeline.source import Source, SourceReader
from .observers import HistogramObserver, make_observer
from .smoothing import AUTO, GroupChoice, choose

Tensor = torch.Tensor


@dataclass
class LinearStats:
    """What calibration collects for one Linear: its input range and (optionally) X^T X / tokens."""

    observer: Any
    hessian: Tensor | None = None
    tokens: int = 0
    shares_input_with: str | None = None  # another Linear of the layer that sees the very same input
    channels: HistogramObserver | None = None  # per-channel histogram of the input, for smoothing
    samples: list[Tensor] = field(default_factory=list)  # the first windows' inputs, for the alpha search
    smoothing: GroupChoice | None = None  # the smoothing chosen for the Linear's group


@dataclass
class CalibrationSettings:
    observer: str = "minmax"
    per_channel: bool = False
    percentile: float = 99.99
    hessian: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    smooth: str | float | None = None  # SmoothQuant: None, "auto" (alpha searched per group) or a fixed alpha
    smooth_samples: int = 8  # windows the alpha search measures the output error on


class _Caught(Exception):
    """Raised by the last layer's stand-in: every layer's inputs are recorded."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments the model gives it and passes the hidden states
    on unchanged (only the other arguments are wanted from the later layers); the last one stops the model.
    Attributes it lacks are the layer's (a model may read one, such as its attention type)."""

    def __init__(self, layer: nn.Module, index: int, records: dict[int, tuple[tuple, dict]], last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: the skeleton's parameters stay as they are
        self.index, self.records, self.last = index, records, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.records[self.index] = (args, kwargs)
        if self.last:
            raise _Caught
        return args[0] if args else kwargs["hidden_states"]


def build_skeleton(config_dict: dict[str, Any]) -> nn.Module:
    """The transformers model for ``config.json`` with parameters on the meta device, buffers real."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: PLC0415 - heavy import

    cfg = dict(config_dict)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise QuantaError("config.json has no model_type: cannot build the model for calibration")
    config = AutoConfig.for_model(model_type, **cfg)
    arch = (config.architectures or [""])[0]
    auto = AutoModelForCausalLM if arch.endswith(("ForCausalLM", "LMHeadModel")) else AutoModel
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config)
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The one ModuleList holding the decoder layers (num_hidden_layers long); a clear error otherwise."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise QuantaError(
            f"cannot calibrate {type(model).__name__} layer by layer: expected one ModuleList of {n} decoder "
            f"layers, found {len(lists)}"
        )
    return lists[0]


def materialise(module: nn.Module, prefix: str, reader: SourceReader, device: str, dtype: torch.dtype) -> None:
    """Load every parameter of ``module`` from the checkpoint (names ``prefix.<param>``)."""
    for name, param in list(module.named_parameters()):
        full = f"{prefix}.{name}" if prefix else name
        if full not in reader.source.tensors:
            raise QuantaError(f"tensor {full} is missing from the checkpoint")
        value_dtype = dtype if param.is_floating_point() else param.dtype
        value = reader.get(full).to(device=device, dtype=value_dtype)
        # dtype must be given: accelerate otherwise casts the value back to the skeleton's dtype.
        set_module_tensor_to_device(module, name, device, value=value, dtype=value_dtype)


def release(module: nn.Module) -> None:
    """Send ``module``'s parameters back to the meta device, freeing their memory."""
    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta")


def _move(value: Any, device: str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _outside_layers(model: nn.Module, list_name: str) -> list[tuple[str, nn.Module]]:
    """The modules with parameters that run before the decoder layers: everything outside the layer list
    except the output head (e.g. Llama's embed_tokens and final norm, BERT's embeddings and pooler)."""
    head = model.get_output_embeddings()
    out = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        inside = name == list_name or name.startswith(list_name + ".")
        if own and not inside and module is not head:
            out.append((name, module))
    return out


LayerArgs = tuple[tuple[Any, ...], dict[str, Any]]  # what the model passes a layer besides the hidden states


def layer_inputs(
    model: nn.Module,
    list_name: str,
    layers: nn.ModuleList,
    windows: Tensor,
    settings: CalibrationSettings,
    reader: SourceReader,
) -> tuple[list[Tensor], list[LayerArgs]]:
    """Embed each window; returns layer 0's hidden states and, per layer, the other arguments the model passes
    it (the last window's: every window has the same length).

    Only the modules outside the layer list (embeddings, small norms) are materialised, and released after.
    """  # fmt: skip
    outside = _outside_layers(model, list_name)
    embeddings = model.get_input_embeddings()
    for name, module in outside:
        # The embedding table stays in the checkpoint's dtype (a bf16 128k-vocabulary table is 0.8 GB, 1.6 GB
        # in fp32); its output is cast instead, which gives the same values as an fp32 lookup.
        _materialise_own(module, name, reader, settings.device, None if module is embeddings else settings.dtype)
    cast = embeddings.register_forward_hook(lambda _m, _args, out: out.to(settings.dtype))
    originals = list(layers)
    records: dict[int, tuple[tuple, dict]] = {}
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, records, last=i == len(originals) - 1)
    hidden: list[Tensor] = []
    try:
        for window in windows:
            records.clear()
            try:
                model(input_ids=window.unsqueeze(0).to(settings.device), use_cache=False)
            except _Caught:
                pass
            except (NotImplementedError, RuntimeError) as exc:
                if "meta" in str(exc):
                    raise QuantaError(
                        f"{type(model).__name__} reads its output head before the first decoder layer; "
                        "layer-wise calibration does not support it"
                    ) from None
                raise
            if len(records) != len(originals):
                raise QuantaError(
                    f"{type(model).__name__} did not call its {len(originals)} decoder layers in turn; "
                    "layer-wise calibration does not support it"
                )
            args, kwargs = records[0]
            hidden.append(args[0] if args else kwargs["hidden_states"])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        cast.remove()
        for _, module in outside:
            release(module)
    per_layer = []
    for i in range(len(originals)):
        args, kwargs = records[i]
        rest = args[1:] if args else ()
        others = {k: _move(v, settings.device) for k, v in kwargs.items() if k != "hidden_states"}
        per_layer.append((_move(rest, settings.device), others))
    return hidden, per_layer


def _materialise_own(
    module: nn.Module, prefix: str, reader: SourceReader, device: str, dtype: torch.dtype | None
) -> None:
    """Like :func:`materialise` for ``module``'s own parameters only (not its children's); ``dtype=None``
    keeps the checkpoint's dtype."""
    for name, param in list(module.named_parameters(recurse=False)):
        full = f"{prefix}.{name}" if prefix else name
        if full not in reader.source.tensors:
            raise QuantaError(f"tensor {full} is missing from the checkpoint")
        stored = reader.source.tensors[full].dtype
        value_dtype = (dtype or stored) if param.is_floating_point() else param.dtype
        value = reader.get(full).to(device=device, dtype=value_dtype)
        set_module_tensor_to_device(module, name, device, value=value, dtype=value_dtype)


@contextmanager
def observing(
    layer: nn.Module, settings: CalibrationSettings, channel_linears: frozenset[str] = frozenset()
) -> Iterator[dict[str, LinearStats]]:
    """Hooks on every nn.Linear of ``layer`` that feed its input to an observer and to X^T X, and for the
    Linears named in ``channel_linears`` (smoothing groups) to a per-channel histogram."""
    stats: dict[str, LinearStats] = {}
    # One window's Linear inputs with the Linear that saw each first. Holding the tensors keeps their
    # memory from being reused, so identity (not address) tells that q/k/v read the very same input.
    seen: list[tuple[Tensor, str]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            st = stats.setdefault(
                name, LinearStats(make_observer(settings.observer, settings.per_channel, settings.percentile))
            )
            st.observer.update(x)
            owner = next((n for t, n in seen if t is x), None)
            if owner is None:
                seen.append((x, name))
            elif owner != name:
                st.shares_input_with = owner
                return
            if name in channel_linears:
                st.channels = st.channels or HistogramObserver(per_channel=True)
                st.channels.update(x)
                if settings.smooth == AUTO and len(st.samples) < settings.smooth_samples:
                    st.samples.append(x.detach().reshape(-1, x.shape[-1]).float().clone())
            if settings.hessian:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                xtx = flat.T @ flat
                st.hessian = xtx if st.hessian is None else st.hessian + xtx
                st.tokens += flat.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    layer._quanta_seen = seen  # type: ignore[attr-defined]  # cleared between windows by run_layer
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        # The list holds the last window's Linear inputs; left on the layer (which lives on, on the meta
        # device) it kept ~35 MB per layer of a 3B model alive until the end of the run.
        seen.clear()
        del layer._quanta_seen


@torch.no_grad()
def run_layer(
    layer: nn.Module, hidden: list[Tensor], args: tuple[Any, ...], kwargs: dict[str, Any], stats: Any
) -> list[Tensor]:
    """Run every window through ``layer``; returns the outputs (the next layer's inputs)."""
    out = []
    for h in hidden:
        layer._quanta_seen.clear()  # type: ignore[attr-defined]
        result = layer(h, *args, **kwargs)
        out.append(result[0] if isinstance(result, tuple) else result)
    return out


@dataclass
class LayerwiseRun:
    """The per-layer loop; ``on_layer(index, prefix, stats)`` receives each layer's statistics."""

    source: Source
    settings: CalibrationSettings = field(default_factory=CalibrationSettings)

    @torch.no_grad()
    def run(
        self,
        windows: Tensor,
        on_layer: Callable[[int, str, dict[str, LinearStats]], None],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if self.source.config is None:
            raise QuantaError("calibration needs a model folder with config.json (a bare .safetensors file has none)")
        self.model = model = build_skeleton(self.source.config)
        list_name, layers = decoder_layers(model)
        with SourceReader(self.source) as reader:
            hidden, layer_args = layer_inputs(model, list_name, layers, windows, self.settings, reader)
            for i, layer in enumerate(layers):
                args, kwargs = layer_args[i]
                prefix = f"{list_name}.{i}"
                materialise(layer, prefix, reader, self.settings.device, self.settings.dtype)
                groups = self.groups(layer)
                channel_linears = frozenset(n for g in groups for n in g.linears)
                with observing(layer, self.settings, channel_linears) as stats:
                    hidden = run_layer(layer, hidden, args, kwargs, stats)
                if groups:
                    self.smooth(layer, groups, stats)
                release(layer)
                on_layer(i, prefix, stats)
                if progress is not None:
                    progress(i + 1, len(layers))

    def groups(self, layer: nn.Module) -> list[SmoothGroup]:
        """The layer's smoothing groups when smoothing is asked for and the architecture supports it."""
        if self.settings.smooth is None:
            return []
        return smoothing_groups((name for name, _ in layer.named_modules()), self.source.config or {})

    def smooth(self, layer: nn.Module, groups: list[SmoothGroup], stats: dict[str, LinearStats]) -> None:
        """Choose each group's smoothing and attach it to the group's Linears in ``stats``."""
        s = self.settings
        channels = {n: st.channels for n, st in stats.items() if st.channels is not None}
        samples = {n: st.samples for n, st in stats.items() if st.samples}
        for choice in choose(layer, groups, channels, samples, s.smooth, s.observer, s.percentile):
            for name in choice.group.linears:
                stats[name].smoothing = choice
                stats[name].samples = []
