"""Algorithms that change what is quantized (not how): SmoothQuant's per-channel smoothing."""

from .smoothquant import (
    AUTO,
    LLAMA_LIKE,
    ChannelScale,
    Heads,
    SmoothGroup,
    fold_scales,
    parse_smooth,
    smoothing_factors,
    smoothing_groups,
)

__all__ = [
    "AUTO",
    "LLAMA_LIKE",
    "ChannelScale",
    "Heads",
    "SmoothGroup",
    "fold_scales",
    "parse_smooth",
    "smoothing_factors",
    "smoothing_groups",
]
