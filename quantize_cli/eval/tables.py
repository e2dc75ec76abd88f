"""Rich tables of an ``EvalReport`` for the terminal."""

from __future__ import annotations

import math

from rich.table import Table

from .metrics import MetricsReport, TensorError
from .runner import EvalReport


def _num(value: float | None, fmt: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def ppl_table(report: EvalReport) -> Table:
    """Perplexity (and KL divergence from the baseline) as a two-column table."""
    table = Table(title="quanta eval")
    table.add_column("measure", no_wrap=True)
    table.add_column("value", justify="right")
    p = report.ppl
    if p is None:
        return table
    rows = [
        ("model", report.model),
        ("data", str(report.data)),
        ("windows x seq-len", f"{p.windows} x {report.seq_len}"),
        ("predicted tokens", str(p.tokens)),
        ("mean NLL (nats)", _num(p.nll)),
        ("perplexity", _num(p.ppl)),
    ]
    k = report.kld
    if k is not None:
        rows += [
            ("baseline", str(report.baseline)),
            ("baseline perplexity", _num(k.baseline_ppl)),
            ("PPL / baseline PPL", _num(p.ppl / k.baseline_ppl)),
            ("KL divergence, mean", _num(k.mean, ".6f")),
            ("KL divergence, median", _num(k.median, ".6f")),
            ("KL divergence, 99th percentile", _num(k.p99, ".6f")),
            ("KL divergence, max", _num(k.max, ".6f")),
            ("top-1 agreement", f"{100 * k.top1_agreement:.2f} %"),
        ]
    for row in rows:
        table.add_row(*row)
    return table


def scheme_table(metrics: MetricsReport) -> Table:
    """Per scheme: tensors, parameters, mean weight error, mean SNR, max abs error, mean output error."""
    table = Table(title="weight error by scheme", caption=f"against the source {metrics.source}")
    for col in ("scheme", "tensors", "parameters", "‖ΔW‖/‖W‖", "SNR dB", "max |ΔW|", "‖ΔY‖/‖Y‖"):
        table.add_column(col, justify="left" if col == "scheme" else "right", no_wrap=True)
    for scheme, s in metrics.by_scheme().items():
        table.add_row(
            scheme,
            str(s["tensors"]),
            f"{s['parameters']:,}",
            _num(s["weight_error"]),
            _num(s["snr_db"], ".2f"),
            _num(s["max_abs_error"], ".4g"),
            _num(s["output_error"]),
        )
    return table


def worst_table(metrics: MetricsReport) -> Table:
    """The ten tensors with the largest output error (weight error without data)."""
    by = "output" if any(t.output_error is not None for t in metrics.tensors) else "weight"
    table = Table(title=f"worst tensors by {by} error" + (f" (data: {metrics.data})" if metrics.data else ""))
    for col in ("tensor", "scheme", "‖ΔW‖/‖W‖", "SNR dB", "max |ΔW|", "‖ΔY‖/‖Y‖"):
        left = col in ("tensor", "scheme")
        table.add_column(col, justify="left" if left else "right", overflow="fold", no_wrap=col != "tensor")
    for t in metrics.worst():
        table.add_row(*_tensor_row(t))
    return table


def _tensor_row(t: TensorError) -> tuple[str, ...]:
    return (
        t.name,
        t.scheme,
        _num(t.weight_error),
        _num(t.snr_db, ".2f"),
        _num(t.max_abs_error, ".4g"),
        _num(t.output_error),
    )


def report_tables(report: EvalReport) -> list[Table]:
    """Every table the report has, in print order."""
    tables = [ppl_table(report)] if report.ppl is not None else []
    if report.metrics is not None:
        tables += [scheme_table(report.metrics), worst_table(report.metrics)]
    return tables
