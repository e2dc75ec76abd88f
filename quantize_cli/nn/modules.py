"""Linear layers whose weight stays packed: ``QuantLinear`` and the drop-ins ``Linear4bit``, ``Linear8bitLt``.

A quantized module holds its weight as buffers named like the tensors on disk (DESIGN §3): ``weight``
(the packed codes), ``weight_scale`` and, where the scheme has them, ``weight_global_scale`` and
``weight_zero_point``; a W8A8 module (``int8-static``) also holds ``input_scale``, its static int8
activation scale from calibration. Buffers move with ``.to(device)`` and appear in ``state_dict``; a dtype cast
(``.to(torch.float16)``, ``.half()``) never touches them and only sets the compute dtype, so nothing is
re-quantized or rounded as a side effect of ``.to()``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import check_block_size, dequantize, quantize
from ..format import SUFFIXES
from ..schemes import QuantState, Scheme, get_scheme
from .functional import codebook, fake_quantize_input, quant_linear

Tensor = torch.Tensor

# QuantState field -> buffer name; the names match the on-disk names of the weight ``P.weight``.
BUFFERS: dict[str, str] = {field: "weight" + suffix for field, suffix in SUFFIXES.items()}
# Fields that depend on an option rather than on the scheme (asymmetric int4's zero point).
_OPTIONAL = ("zero_point",)
# The static activation scale: 0-d fp32, on disk as ``P.input_scale`` next to ``P.weight``.
INPUT_SCALE = "input_scale"
# Buffers that .to(dtype) must not cast.
_PROTECTED = (*BUFFERS.values(), INPUT_SCALE)


@lru_cache(maxsize=256)
def _layout(scheme: str, in_features: int, block_size: int | None, options: tuple) -> dict[str, tuple]:
    """{field: (per-row shape or None for a per-tensor value, dtype)} of a packed (rows, in_features) weight.

    Found by quantizing one row of ones, so every scheme in the registry works without a table here.
    """
    probe = quantize(torch.ones(1, in_features), scheme, block_size, backend="reference", **dict(options))
    tensors, _ = probe.to_dict()
    return {field: (tuple(t.shape[1:]) if t.dim() == 2 else None, t.dtype) for field, t in tensors.items()}


def _hashable_options(options: dict[str, Any]) -> tuple:
    # Tensor options (NVFP4's global_scale) are data for one quantize call, not part of the layout.
    return tuple(sorted((k, v) for k, v in options.items() if not isinstance(v, torch.Tensor)))


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` with ``W`` kept packed in any weight-only scheme of the registry.

    ``in_features``/``out_features``/``bias``: as ``nn.Linear``. ``scheme``, ``block_size`` (None: the
    scheme's default; a per-row scheme takes ``in_features``) and ``options`` (e.g. ``symmetric=False``
    for int4) describe the packed weight; ``dtype`` is the dtype the codes stand for (and the bias
    dtype). ``compute_dtype``: dtype of the dequantized weight and of the matmul (None: the input's);
    the output comes back in the input's dtype. ``static_input=True`` adds the ``input_scale`` buffer of
    a W8A8 scheme: the input is then rounded to int8 with it before the matmul.

    A new module holds zero codes (like ``nn.Linear``'s random init, a placeholder until
    ``load_state_dict``); ``float_weight=True`` starts instead with an ``nn.Linear``-initialised float
    weight that :meth:`quantize_weight` packs later, as bitsandbytes' modules do.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scheme: str = "nf4",
        block_size: int | None = None,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        float_weight: bool = False,
        static_input: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        spec = get_scheme(scheme)
        unknown = set(options) - set(spec.options)
        if unknown:
            raise ValueError(f"scheme {spec.name} takes no option(s) {', '.join(sorted(unknown))}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = spec.name
        self.block_size = _block_for(spec, block_size, in_features)
        self.options = options
        self.compute_dtype = compute_dtype
        self.weight_dtype = dtype or torch.get_default_dtype()
        if float_weight:
            init = nn.Linear(in_features, out_features, bias, device=device, dtype=self.weight_dtype)
            self.weight = init.weight
            self.bias = init.bias
            self._register_absent_buffers(static_input, device)
            return
        for field, (row_shape, buf_dtype) in self._expected_layout().items():
            shape = (out_features, *row_shape) if row_shape is not None else ()
            self.register_buffer(BUFFERS[field], torch.zeros(shape, dtype=buf_dtype, device=device))
        self._register_absent_buffers(static_input, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype)) if bias else None

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: str,
        block_size: int | None = None,
        input_scale: Tensor | None = None,
        **options: Any,
    ) -> QuantLinear:
        """Quantize ``linear.weight`` (out, in) with ``scheme``; the bias is copied unchanged.

        ``input_scale``: a static int8 activation scale (0-d, from calibration) for W8A8 schemes.
        """
        state = quantize(linear.weight.detach(), scheme, block_size, **options)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_state(state, bias, input_scale)

    @classmethod
    def from_state(
        cls, state: QuantState, bias: Tensor | None = None, input_scale: Tensor | None = None
    ) -> QuantLinear:
        """Wrap an already quantized (out_features, in_features) weight; its tensors are used as they are."""
        if len(state.shape) != 2:
            raise ValueError(f"a Linear weight is 2-D (out_features, in_features), got shape {tuple(state.shape)}")
        out_features, in_features = state.shape
        module = cls.__new__(cls)
        QuantLinear.__init__(
            module, in_features, out_features, bias is not None, state.scheme, state.block_size,
            device="meta", dtype=state.dtype,
        )  # fmt: skip
        module._set_packed(state)
        if bias is not None:
            module.bias = nn.Parameter(bias)
        if input_scale is not None:
            module.input_scale = input_scale.detach().to(device=state.qdata.device, dtype=torch.float32).reshape(())
        return module

    # -- state ----------------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        """False while the module still holds a float weight (``float_weight=True`` before ``quantize_weight``)."""
        return not isinstance(self.weight, nn.Parameter)

    def quant_state(self) -> QuantState:
        """The packed weight as a ``QuantState`` viewing this module's buffers (no copy)."""
        if not self.is_quantized:
            raise ValueError("the weight is not quantized yet; call quantize_weight() first")
        tensors = {field: getattr(self, name) for field, name in BUFFERS.items()}
        return QuantState(
            codebook=codebook(self.scheme, self.weight.device),
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            scheme=self.scheme,
            block_size=self.block_size,
            **tensors,
        )

    def quantize_weight(self, block_size: int | None = None) -> QuantLinear:
        """Pack the float weight with the module's scheme (``block_size`` None: the module's); returns self.

        Runs where the weight is (Triton on CUDA). Refuses a weight that is already packed: quantizing
        twice would compound the error.
        """
        if self.is_quantized:
            raise ValueError("the weight is already quantized")
        block = self.block_size if block_size is None else block_size
        state = quantize(self.weight.detach(), self.scheme, block, **self.options)
        self._set_packed(state)
        return self

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) float weight the codes stand for, in ``dtype`` (None: the original)."""
        if not self.is_quantized:
            return self.weight.detach().to(dtype or self.weight.dtype)
        return dequantize(self.quant_state(), dtype=dtype)

    def _set_packed(self, state: QuantState) -> None:
        """Replace the weight (float or packed) by ``state``'s tensors."""
        tensors, _ = state.to_dict()
        self._parameters.pop("weight", None)
        for field, name in BUFFERS.items():
            self._buffers.pop(name, None)
            self.register_buffer(name, tensors.get(field))
        self.block_size = state.block_size
        self.weight_dtype = state.dtype
        if "symmetric" in get_scheme(self.scheme).options:
            self.options = {**self.options, "symmetric": state.zero_point is None}

    def _register_absent_buffers(self, static_input: bool = False, device: torch.device | str | None = None) -> None:
        # A None buffer keeps the attribute readable and stays out of state_dict.
        for name in BUFFERS.values():
            if name not in self._buffers and name not in self._parameters:
                self.register_buffer(name, None)
        scale = torch.ones((), dtype=torch.float32, device=device) if static_input else None
        self.register_buffer(INPUT_SCALE, scale)

    def _expected_layout(self) -> dict[str, tuple]:
        return _layout(self.scheme, self.in_features, self.block_size, _hashable_options(self.options))

    # -- compute --------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype; the matmul runs in the compute dtype."""
        dtype = self.compute_dtype or x.dtype
        if not self.is_quantized:
            bias = None if self.bias is None else self.bias.to(dtype)
            h = x.to(dtype) if self.input_scale is None else fake_quantize_input(x.to(dtype), self.input_scale)
            return F.linear(h, self.weight.to(dtype), bias).to(x.dtype)
        return quant_linear(x.to(dtype), self.quant_state(), self.bias, self.input_scale).to(x.dtype)

    # -- device / dtype moves -------------------------------------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantLinear:
        """Move packed buffers with the module but never cast them: a dtype change becomes the compute dtype."""
        if not self.is_quantized and self.input_scale is None:
            target = _cast_target(fn, self.weight.device)
            super()._apply(fn, recurse)
            self.compute_dtype = target or self.compute_dtype
            return self
        device = self.weight.device
        target = _cast_target(fn, device)
        packed = {name: t for name in _PROTECTED if (t := self._buffers.get(name)) is not None}
        for name in packed:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in packed.items():
                self._buffers[name] = _move(t, fn, target is not None, device)
        if target is not None:
            self.compute_dtype = target
        return self

    # -- loading --------------------------------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Allocate the packed buffers from the incoming keys (block size and zero point included), then load.

        A float module (``float_weight=True``) given a quantized state dict becomes quantized, as with
        bitsandbytes; a float state dict into a float module loads as ``nn.Linear`` would.
        """
        incoming = {f: state_dict[prefix + n] for f, n in BUFFERS.items() if prefix + n in state_dict}
        if self.is_quantized or set(incoming) - {"qdata"}:
            self._allocate_from(incoming, prefix, error_msgs)
        scale = state_dict.get(prefix + INPUT_SCALE)
        if scale is not None and (self.input_scale is None or self.input_scale.shape != scale.shape):
            self._buffers[INPUT_SCALE] = torch.empty(scale.shape, dtype=torch.float32, device=self.weight.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _allocate_from(self, incoming: dict[str, Tensor], prefix: str, error_msgs: list[str]) -> None:
        device = self.weight.device
        spec = get_scheme(self.scheme)
        block = self._infer_block(incoming, prefix, error_msgs)
        if block is not False:
            self.block_size = block
        if "symmetric" in spec.options and "qdata" in incoming:
            self.options = {**self.options, "symmetric": "zero_point" not in incoming}
        expected = self._expected_layout()
        self._parameters.pop("weight", None)
        for field, name in BUFFERS.items():
            t = incoming.get(field)
            if t is not None:
                cur = self._buffers.get(name)
                if cur is None or cur.shape != t.shape or cur.dtype != t.dtype:
                    self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=device)
            elif field in expected and field not in _OPTIONAL:
                # Keep (or make) a placeholder so load_state_dict reports the key as missing.
                row_shape, dtype = expected[field]
                shape = (self.out_features, *row_shape) if row_shape is not None else ()
                if self._buffers.get(name) is None:
                    self._buffers[name] = torch.zeros(shape, dtype=dtype, device=device)
            else:
                self._buffers[name] = None

    def _infer_block(self, incoming: dict[str, Tensor], prefix: str, error_msgs: list[str]) -> int | None | bool:
        """The block size the incoming codes and scales were packed with (False: nothing to infer from)."""
        qdata, scale = incoming.get("qdata"), incoming.get("scale")
        if qdata is None:
            return False
        spec = get_scheme(self.scheme)
        cols = qdata.shape[-1] * (2 if spec.packed else 1) if qdata.dim() == 2 else -1
        rows = qdata.shape[0] if qdata.dim() == 2 else -1
        want = f"a ({self.out_features}, {self.in_features}) {spec.name} weight"
        if "scale" not in self._expected_layout():  # a cast: the codes are the weight
            if (rows, cols) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: codes {tuple(qdata.shape)} do not hold {want}")
            return None
        if scale is None:
            return False  # the placeholder scale makes load_state_dict report it missing
        blocks = scale.shape[-1] if scale.dim() == 2 else 0
        block = cols // blocks if blocks and cols % blocks == 0 else 0
        if rows != self.out_features or not block or not (0 <= cols - self.in_features < block):
            error_msgs.append(
                f"size mismatch for {prefix}weight: codes {tuple(qdata.shape)} and scales {tuple(scale.shape)} "
                f"do not hold {want}"
            )
            return False
        return block

    def extra_repr(self) -> str:
        state = f"scheme={self.scheme}, block_size={self.block_size}" if self.is_quantized else "float (not quantized)"
        options = "".join(f", {k}={v}" for k, v in _hashable_options(self.options))
        options += ", static int8 input" if self.input_scale is not None else ""
        compute = f", compute_dtype={self.compute_dtype}" if self.compute_dtype else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{state}{options}{compute}"
        )


def _block_for(spec: Scheme, block_size: int | None, in_features: int) -> int | None:
    """The module's block size: per-row schemes (W8A8) always use the whole row."""
    if spec.per_row:
        if block_size not in (None, in_features):
            raise ValueError(f"{spec.name} uses one scale per row; block_size must be None (got {block_size})")
        return in_features
    return check_block_size(spec, block_size)


def _cast_target(fn: Callable[[Tensor], Tensor], device: torch.device) -> torch.dtype | None:
    """The dtype ``fn`` casts floating tensors to, or None if it keeps dtypes (a pure device move)."""
    for dtype in (torch.float16, torch.float32):
        out = fn(torch.empty(0, dtype=dtype, device=device))
        if out.dtype != dtype:
            return out.dtype
    return None


def _move(t: Tensor, fn: Callable[[Tensor], Tensor], casts: bool, device: torch.device) -> Tensor:
    """Apply ``fn`` to a packed buffer, or, when ``fn`` casts, only its device change."""
    if not casts:
        return fn(t)
    target = fn(torch.empty(0, dtype=torch.float32, device=device)).device
    return torch.empty_like(t, device=target) if t.is_meta else t.to(target)


class Linear4bit(QuantLinear):
    """Drop-in for bitsandbytes' ``Linear4bit``: a float weight until :meth:`quantize_weight` packs it.

    ``quant_type``: ``nf4`` or ``fp4`` as in bitsandbytes, or any other 4-bit scheme (``int4``,
    ``nvfp4``, ``mxfp4``). ``compute_dtype``: see :class:`QuantLinear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        spec = get_scheme(quant_type)
        if spec.bits != 4:
            raise ValueError(f"Linear4bit needs a 4-bit scheme, got {spec.name} ({spec.bits} bits)")
        super().__init__(
            in_features, out_features, bias, spec.name, None, compute_dtype, device, dtype, float_weight=True
        )

    def quantize_weight(self, block_size: int | None = 64) -> Linear4bit:
        """Pack the weight in blocks of ``block_size`` along in_features (None: the scheme's default)."""
        return super().quantize_weight(block_size or get_scheme(self.scheme).default_block_size)


class Linear8bitLt(QuantLinear):
    """Drop-in for bitsandbytes' ``Linear8bitLt`` (weight-only int8): a float weight until :meth:`quantize_weight`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, "int8", None, compute_dtype, device, dtype, float_weight=True)

    def quantize_weight(self, block_size: int | None = 64) -> Linear8bitLt:
        """Pack to int8 with one absmax scale per ``block_size`` inputs; None: one scale per output row."""
        return super().quantize_weight(self.in_features if block_size is None else block_size)
