"""The one registry of schemes. Adding a scheme: one module plus one line in ``_ALL``."""

from __future__ import annotations

from .base import Scheme
from .cast import BF16, FP16
from .codebook import FP4, NF4, NF8
from .fp8 import FP8
from .integer import INT4, INT8, INT8_STATIC
from .mxfp4 import MXFP4
from .nvfp4 import NVFP4

_ALL: tuple[Scheme, ...] = (INT8, INT4, NF4, FP4, NF8, FP8, NVFP4, MXFP4, FP16, BF16, INT8_STATIC)

SCHEMES: dict[str, Scheme] = {s.name: s for s in _ALL}
ALIASES: dict[str, str] = {alias: s.name for s in _ALL for alias in s.aliases}


class UnknownSchemeError(ValueError):
    """A scheme name that is neither registered nor an alias."""


def scheme_names(with_aliases: bool = False) -> list[str]:
    return list(SCHEMES) + (list(ALIASES) if with_aliases else [])


def get_scheme(name: str) -> Scheme:
    """The scheme registered as ``name`` or under the alias ``name``."""
    key = ALIASES.get(name, name)
    if key not in SCHEMES:
        raise UnknownSchemeError(f"unknown scheme {name!r}; valid schemes: {', '.join(scheme_names(True))}")
    return SCHEMES[key]
