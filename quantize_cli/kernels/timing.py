"""CUDA-graph timing shared by the kernel tuners and the benchmarks: device time without host costs."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def capture(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``body()`` (run it once eagerly first: compiles and allocations stay outside)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median milliseconds of one replay of ``graph`` over ``replays`` timed replays (after one untimed)."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
