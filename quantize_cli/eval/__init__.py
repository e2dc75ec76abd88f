"""Evaluation: perplexity, KL divergence from a baseline, per-tensor error metrics (``quanta eval``)."""

from .kld import KLDivergence
from .metrics import MetricsReport, TensorError, tensor_metrics
from .perplexity import Perplexity, perplexity
from .runner import EvalReport, evaluate, write_json
from .tables import report_tables

__all__ = [
    "EvalReport",
    "KLDivergence",
    "MetricsReport",
    "Perplexity",
    "TensorError",
    "evaluate",
    "perplexity",
    "report_tables",
    "tensor_metrics",
    "write_json",
]
