"""Recipes: which tensors get which scheme, as YAML or built from ``--scheme``/``--block-size``/``--ignore``.

Schema (every key optional except that a recipe must quantize something: ``scheme`` or ``rules``)::

    scheme: nf4            # default scheme for the targeted tensors
    block_size: 64         # default block (the scheme's own when absent)
    targets: linear        # linear: 2-D weights of Linear layers inside the model's blocks; all-2d: every
                           # 2-D floating-point tensor (embeddings and lm_head included)
    ignore: [glob, ...]    # never quantized (wins over everything)
    rules:                 # first match wins; may also reach tensors outside ``targets``
      - match: "*.mlp.down_proj"   # glob, or "re:<regex>" (full match)
        scheme: int8               # or "none" to keep the tensor as it is
        block_size: 128
        symmetric: false           # any option of the rule's scheme
    # options of the default scheme may sit at the top level too (e.g. symmetric: false for int4)

A pattern matches a tensor if it matches the tensor's name (``model.layers.0.mlp.up_proj.weight``) or
its module's name (the same without ``.weight``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..api import check_block_size
from ..errors import QuantaError
from ..schemes import get_scheme

TARGETS = ("linear", "all-2d")
_TOP_KEYS = ("scheme", "block_size", "targets", "ignore", "rules", "description")
_RULE_KEYS = ("match", "scheme", "block_size")
_NONE = ("none", "null", "skip")


def _module_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


@dataclass(frozen=True)
class Pattern:
    """A glob or ``re:`` regex over tensor names (or their module names)."""

    text: str

    def __post_init__(self) -> None:
        if self.text.startswith("re:"):
            try:
                re.compile(self.text[3:])
            except re.error as exc:
                raise QuantaError(f"invalid regex {self.text!r}: {exc}") from None

    @property
    def literal(self) -> bool:
        """True for a plain tensor or module name (no glob characters, not a regex)."""
        return not self.text.startswith("re:") and not any(c in self.text for c in "*?[")

    def matches(self, name: str) -> bool:
        candidates = (name, _module_name(name))
        if self.text.startswith("re:"):
            rx = re.compile(self.text[3:])
            return any(rx.fullmatch(c) for c in candidates)
        return any(fnmatch.fnmatchcase(c, self.text) for c in candidates)


@dataclass(frozen=True)
class Rule:
    """``match`` -> scheme (None keeps the tensor), block size (None: the scheme's) and scheme options."""

    match: Pattern
    scheme: str | None
    block_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "match": self.match.text,
            "scheme": self.scheme or "none",
            "block_size": self.block_size,
            **self.options,
        }


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``name`` names the default output folder (``<model>-<name>``)."""

    name: str
    scheme: str | None = "nf4"
    block_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    targets: str = "linear"
    ignore: tuple[Pattern, ...] = ()
    rules: tuple[Rule, ...] = ()
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as used, for ``quantization_map.json``."""
        out: dict[str, Any] = {"name": self.name, "scheme": self.scheme or "none", "block_size": self.block_size}
        out.update(self.options)
        out["targets"] = self.targets
        out["ignore"] = [p.text for p in self.ignore]
        out["rules"] = [r.to_dict() for r in self.rules]
        return out


def _check_scheme(
    where: str, scheme: Any, block_size: Any, options: dict[str, Any], keys: tuple[str, ...]
) -> tuple[str | None, int | None]:
    """(canonical scheme name or None, block size) after checking the name, the block and the options.

    ``options`` are the mapping's keys outside ``keys``: each must be an option of the scheme.
    """
    if scheme is None or (isinstance(scheme, str) and scheme.lower() in _NONE):
        if options:
            raise QuantaError(f"{where}: unknown key {next(iter(options))!r}; valid keys: {', '.join(keys)}")
        if block_size is not None:
            raise QuantaError(f"{where}: block_size given without a scheme")
        return None, None
    if not isinstance(scheme, str):
        raise QuantaError(f"{where}: scheme must be a name, got {scheme!r}")
    try:
        spec = get_scheme(scheme)
        check_block_size(spec, block_size)
    except ValueError as exc:
        raise QuantaError(f"{where}: {exc}") from None
    for key, value in options.items():
        if key not in spec.options:
            valid = ", ".join(keys + spec.options)
            raise QuantaError(f"{where}: unknown key {key!r} for scheme {spec.name}; valid keys: {valid}")
        if not isinstance(value, (bool, int, float, str)):
            raise QuantaError(f"{where}: option {key} must be a number, boolean or string, got {value!r}")
    return spec.name, block_size


def _split(where: str, data: dict[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known keys, the rest = scheme options) of a mapping; keys must be strings."""
    for key in data:
        if not isinstance(key, str):
            raise QuantaError(f"{where}: keys must be strings, got {key!r}")
    return {k: v for k, v in data.items() if k in keys}, {k: v for k, v in data.items() if k not in keys}


def _patterns(where: str, value: Any) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        raise QuantaError(f"{where}: ignore must be a list of glob or re: patterns")
    try:
        return tuple(Pattern(p) for p in items)
    except QuantaError as exc:
        raise QuantaError(f"{where}: {exc}") from None


def _rule(where: str, data: Any) -> Rule:
    if not isinstance(data, dict):
        raise QuantaError(f"{where}: a rule must be a mapping with match and scheme")
    known, options = _split(where, data, _RULE_KEYS)
    if not isinstance(known.get("match"), str) or not known["match"]:
        raise QuantaError(f"{where}: missing or empty 'match' pattern")
    if "scheme" not in known:
        raise QuantaError(f"{where}: missing 'scheme' (use scheme: none to keep matching tensors)")
    try:
        pattern = Pattern(known["match"])
    except QuantaError as exc:
        raise QuantaError(f"{where}: {exc}") from None
    scheme, block = _check_scheme(where, known["scheme"], known.get("block_size"), options, _RULE_KEYS)
    return Rule(pattern, scheme, block, options)


def recipe_from_dict(data: Any, name: str, where: str = "recipe") -> Recipe:
    """Validate a parsed recipe; errors name ``where`` (the file) and the offending rule or key."""
    if not isinstance(data, dict):
        raise QuantaError(f"{where}: a recipe must be a YAML mapping (scheme, rules, ignore, ...)")
    known, options = _split(where, data, _TOP_KEYS)
    scheme, block = _check_scheme(where, known.get("scheme"), known.get("block_size"), options, _TOP_KEYS)
    targets = known.get("targets", "linear")
    if targets not in TARGETS:
        raise QuantaError(f"{where}: targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    rules_data = known.get("rules") or []
    if not isinstance(rules_data, list):
        raise QuantaError(f"{where}: rules must be a list")
    rules = tuple(_rule(f"{where}: rule {i + 1}", r) for i, r in enumerate(rules_data))
    if scheme is None and not any(r.scheme for r in rules):
        raise QuantaError(f"{where}: quantizes nothing (give a scheme or a rule with a scheme)")
    ignore = _patterns(where, known.get("ignore"))
    description = known.get("description")
    return Recipe(name, scheme, block, options, targets, ignore, rules, description)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    p = Path(path)
    if not p.is_file():
        raise QuantaError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise QuantaError(f"recipe {p}: invalid YAML: {' '.join(str(exc).split())}") from None
    return recipe_from_dict(data, p.stem, where=f"recipe {p}")


def build_recipe(
    recipe: str | Path | None = None,
    scheme: str | None = None,
    block_size: int | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    method: str | None = None,
) -> Recipe:
    """The recipe a conversion uses: a file (or plain nf4) with ``scheme``/``block_size``/``ignore``/``method``
    on top."""
    base = load_recipe(recipe) if recipe is not None else Recipe(name="nf4")
    where = f"recipe {recipe}" if recipe is not None else "command line"
    new_scheme = base.scheme if scheme is None else scheme
    new_block = base.block_size if block_size is None else block_size
    options = base.options
    if scheme is not None and scheme.lower() not in _NONE and get_scheme(scheme).name != base.scheme:
        options = {}  # the recipe's top-level options belong to the scheme the command line replaced
    if method is not None:
        options = {**options, "method": method}
    flags = where if recipe is None else f"{where} with --scheme/--block-size"
    checked, block = _check_scheme(flags, new_scheme, new_block, options, _TOP_KEYS)
    name = base.name if recipe is not None else checked or "none"
    extra = _patterns(where, list(ignore))
    return replace(base, name=name, scheme=checked, block_size=block, options=options, ignore=base.ignore + extra)
