"""SmoothQuant: move activation outliers into the weights with per-channel factors folded into the model.

For a Linear ``y = x W^T``, dividing input channel j by ``s_j`` and multiplying weight column j by ``s_j``
leaves ``y`` unchanged. With ``s_j = max|x_j|^a / max|W[:, j]|^(1 - a)`` the channel ranges of ``x / s``
and of ``W diag(s)`` meet at ``max|x_j|^(1 - a) max|W[:, j]|^a``, so one per-tensor int8 activation
scale no longer has to stretch over a few outlier channels (Xiao et al., 2022, arXiv:2211.10438).

The division is never computed at run time: it is folded into whatever produced ``x``, so the converted
checkpoint is a standard one and a W8A8 Linear stays a plain int8 matmul:

- q/k/v (and gate/up) read the output of an RMSNorm ``w * x / rms(x)``: ``w`` is divided by ``s``.
- down_proj reads ``act(gate) * up``, linear in up_proj's output: up_proj's rows are divided by ``s``.
- o_proj reads the attention output, per head a mix of v_proj's rows over tokens (never over channels):
  v_proj's rows are divided by ``s``. Under grouped-query attention one kv head serves ``group`` query
  heads, so o_proj's factors are tied (equal) across those heads.

Row scaling leaves a per-row (or per-block) weight quantization of the producer unchanged, up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

Tensor = torch.Tensor

# Model types whose decoder layer is Llama's: RMSNorm ``w * x_hat`` (not Gemma's ``(1 + w) * x_hat``) before
# q/k/v and before a gated MLP, modules named as below.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
# Factors are kept within [1/FACTOR_LIMIT, FACTOR_LIMIT]: a dead channel (max |x| = 0) must not send a norm
# weight to infinity, nor an all-zero weight column a factor to zero.
FACTOR_LIMIT = 1e5
_EPS = 1e-5
AUTO = "auto"  # alpha searched per group during calibration


@dataclass(frozen=True)
class Heads:
    """How o_proj's input channels meet v_proj's output rows under grouped-query attention.

    Input channel ``h * head_dim + d`` of o_proj is row ``(h // group) * head_dim + d`` of v_proj, for
    ``kv_heads * group`` query heads.
    """

    kv_heads: int
    group: int
    head_dim: int

    def tie(self, x: Tensor) -> Tensor:
        """(kv_heads * group * head_dim,) per-channel values -> (kv_heads * head_dim,): the max over each kv
        head's query heads."""
        return x.reshape(self.kv_heads, self.group, self.head_dim).amax(dim=1).reshape(-1)

    def expand(self, x: Tensor) -> Tensor:
        """(kv_heads * head_dim,) -> (kv_heads * group * head_dim,): each kv head's values for its query heads."""
        return x.reshape(self.kv_heads, 1, self.head_dim).expand(-1, self.group, -1).reshape(-1)

    def to_list(self) -> list[int]:
        return [self.kv_heads, self.group, self.head_dim]


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read one input, and where the inverse of their smoothing factors is folded.

    ``kind="norm"``: ``source`` is the norm before them; its weight (and bias, if any) is divided.
    ``kind="rows"``: ``source`` is the Linear whose output they read; its rows (and bias) are divided, and
    with ``heads`` the rows are v_proj's (see :class:`Heads`).
    """

    linears: tuple[str, ...]
    source: str
    kind: str
    heads: Heads | None = None

    def prefixed(self, prefix: str) -> SmoothGroup:
        """The same group with module names under ``prefix`` (e.g. ``model.layers.3``)."""
        return replace(self, linears=tuple(f"{prefix}.{n}" for n in self.linears), source=f"{prefix}.{self.source}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "linears": list(self.linears),
            "source": self.source,
            "kind": self.kind,
            "heads": None if self.heads is None else self.heads.to_list(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SmoothGroup:
        heads = data.get("heads")
        return cls(tuple(data["linears"]), data["source"], data["kind"], None if heads is None else Heads(*heads))


def smoothing_groups(module_names: Iterable[str], config: Mapping[str, Any]) -> list[SmoothGroup]:
    """The smoothing groups of one decoder layer (names relative to the layer), or [] when the architecture
    is not one whose folding is known to be exact (``LLAMA_LIKE``)."""
    if config.get("model_type") not in LLAMA_LIKE:
        return []
    names = set(module_names)
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp = ("mlp.gate_proj", "mlp.up_proj")
    if not names.issuperset({*attn, *mlp, "self_attn.o_proj", "mlp.down_proj", "input_layernorm"}):
        return []
    groups = [SmoothGroup(attn, "input_layernorm", "norm"), SmoothGroup(mlp, "post_attention_layernorm", "norm")]
    groups.append(SmoothGroup(("mlp.down_proj",), "mlp.up_proj", "rows"))
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if heads % kv_heads == 0:
        tied = Heads(kv_heads, heads // kv_heads, head_dim)
        groups.append(SmoothGroup(("self_attn.o_proj",), "self_attn.v_proj", "rows", tied))
    return groups


def smoothing_factors(act_max: Tensor, weight_max: Tensor, alpha: float, heads: Heads | None = None) -> Tensor:
    """``s = act_max^alpha / weight_max^(1 - alpha)`` per input channel, fp32 (in_features,).

    ``act_max``: max |x_j| over the calibration tokens; ``weight_max``: max |W[:, j]| over every Linear of the
    group. With ``heads`` both are first reduced to one value per kv-head channel, so the factors are tied.
    """
    a = act_max.float().clamp(min=_EPS)
    w = weight_max.float().clamp(min=_EPS)
    if heads is not None:
        a, w = heads.tie(a), heads.tie(w)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(1.0 / FACTOR_LIMIT, FACTOR_LIMIT)
    return s if heads is None else heads.expand(s)


@dataclass(frozen=True)
class ChannelScale:
    """``diag(rows) @ t @ diag(cols)`` for a 2-D weight; ``rows * t`` for a 1-D norm weight or bias."""

    rows: Tensor | None = None
    cols: Tensor | None = None

    def merged(self, other: ChannelScale) -> ChannelScale:
        """Both scalings: factors on the same side multiply."""

        def mul(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return b if a is None else a if b is None else a * b

        return ChannelScale(mul(self.rows, other.rows), mul(self.cols, other.cols))

    def apply(self, t: Tensor) -> Tensor:
        """The scaled tensor in fp32 (the caller casts or quantizes it)."""
        out = t.float()
        if self.rows is not None:
            rows = self.rows.to(out.device, torch.float32)
            out = out * (rows if out.dim() == 1 else rows.unsqueeze(1))
        if self.cols is not None:
            if out.dim() != 2:
                raise ValueError(f"column factors need a 2-D weight, got shape {tuple(t.shape)}")
            out = out * self.cols.to(out.device, torch.float32)
        return out


def fold_scales(groups: Iterable[tuple[SmoothGroup, Tensor]]) -> dict[str, ChannelScale]:
    """Checkpoint tensor name -> its scaling, for ``(group, factors)`` pairs with full module names.

    Each Linear of a group gets its weight columns multiplied by the factors; the group's source gets its
    weight (rows) and bias divided by them. Names of biases the checkpoint lacks are simply never asked for.
    """
    scales: dict[str, ChannelScale] = {}

    def add(name: str, scale: ChannelScale) -> None:
        scales[name] = scales[name].merged(scale) if name in scales else scale

    for group, s in groups:
        s = s.float()
        for linear in group.linears:
            add(f"{linear}.weight", ChannelScale(cols=s))
        inverse = 1.0 / (s if group.heads is None else _per_kv_head(s, group.heads))
        add(f"{group.source}.weight", ChannelScale(rows=inverse))
        add(f"{group.source}.bias", ChannelScale(rows=inverse))
    return scales


def _per_kv_head(s: Tensor, heads: Heads) -> Tensor:
    """o_proj's tied (heads * head_dim,) factors as v_proj's (kv_heads * head_dim,) row factors."""
    return s.reshape(heads.kv_heads, heads.group, heads.head_dim)[:, 0].reshape(-1)


def parse_smooth(value: str | float | None) -> str | float | None:
    """A ``--smooth`` value: ``None``/``off`` -> None, ``auto`` -> ``"auto"``, a number in [0, 1] -> that alpha."""
    if value is None or (isinstance(value, str) and value.lower() in ("off", "none", "no")):
        return None
    if isinstance(value, str) and value.lower() == AUTO:
        return AUTO
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--smooth must be auto, off or an alpha in [0, 1], got {value!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--smooth alpha must lie in [0, 1], got {alpha}")
    return alpha
