"""PNG plots of analysis results (matplotlib's Agg canvas; the global backend is never touched).

* :func:`sensitivity_png`: horizontal bar chart of the top-30 rows of a sensitivity table;
* :func:`layer_png`: per-layer cosine and SQNR along the depth of the model;
* :func:`export_layers_png`: onnxruntime vs fake quant per quant point (cosine and error in steps);
* :func:`search_png`: accuracy vs high-precision ratio of a mixed-precision search (cost on a second
  axis when known).

Each returns PNG bytes; write them with :func:`qat_lightning.analysis.reports.render.write_atomic`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qat_lightning.analysis.compare.layer_compare import LayerComparison
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

__all__ = ["sensitivity_png", "layer_png", "export_layers_png", "search_png"]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def sensitivity_png(table: SensitivityTable, top: int = 30) -> bytes:
    """Bar chart of the ``top`` most sensitive rows (most sensitive at the top)."""
    rows = list(table.rows[:top])
    fig = Figure(figsize=(9, 0.28 * max(len(rows), 4) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r.op_name} [{r.sensitive_type[0]}]" for r in rows][::-1]
    values = [r.metric if math.isfinite(r.metric) else 0.0 for r in rows][::-1]
    colors = ["tab:orange" if r.sensitive_type == "weight" else "tab:blue" for r in rows][::-1]
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel(table.metric_name)
    ax.set_title(
        f"sensitivity, output {table.output_name} ({table.method}; blue = activation, orange = weight)",
        fontsize=9,
    )
    return _png(fig)


def _cosine_over_depth(
    labels: Sequence[str], cosine: Sequence[float], lower: Sequence[float], styles: tuple[str, str, str, str]
) -> tuple[Figure, Any]:
    """Draw two stacked plots along depth: cosine on top, ``lower`` below.

    ``styles`` is (color, y label, x label, title) of the lower plot; returns the figure and its lower axes.
    """
    color, ylabel, xlabel, title = styles
    fig = Figure(figsize=(max(6, 0.12 * len(labels) + 4), 6))
    ax1 = fig.add_subplot(2, 1, 1)
    ax2 = fig.add_subplot(2, 1, 2, sharex=ax1)
    x = list(range(len(labels)))
    ax1.plot(x, list(cosine), marker=".")
    ax1.set_ylabel("cosine")
    ax2.plot(x, list(lower), marker=".", color=color)
    ax2.set_ylabel(ylabel)
    ax2.set_xlabel(xlabel)
    if len(labels) <= 60:
        ax2.set_xticks(x, list(labels), rotation=90, fontsize=6)
    ax1.tick_params(labelbottom=False)
    ax1.set_title(title, fontsize=9)
    return fig, ax2


def layer_png(comparison: LayerComparison) -> bytes:
    """Cosine and SQNR of every op's output, in execution order."""
    rows = [r for r in comparison.rows if r.aligned]
    fig, _ = _cosine_over_depth(
        [r.mod_name for r in rows],
        [r.cosine for r in rows],
        [r.sqnr if math.isfinite(r.sqnr) else math.nan for r in rows],
        ("tab:green", "SQNR (dB)", "op (execution order)", "per-layer float vs quantized output"),
    )
    return _png(fig)


def export_layers_png(rows: Sequence[Any], max_steps: float = 1.0) -> bytes:
    """Cosine and error in quantization steps of every compared quant point, in graph order.

    ``rows`` are :class:`~qat_lightning.analysis.export_layers.ExportLayerRow` (``cosine``, ``max_steps``,
    ``op_name``, ``role``); a dashed line marks ``max_steps``.
    """
    fig, lower = _cosine_over_depth(
        [f"{r.op_name} [{r.role}]" for r in rows],
        [r.cosine for r in rows],
        [r.max_steps for r in rows],
        ("tab:red", "max error (steps)", "quant point (graph order)", "per-layer onnxruntime vs fake quant"),
    )
    lower.axhline(max_steps, color="gray", linestyle="--")
    return _png(fig)


def search_png(probes: Sequence[Any], target: float | None = None) -> bytes:
    """Metric vs ratio of the search probes (``ratio``, ``metric``, ``cost`` attributes)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    pts = sorted((p.ratio, p.metric, p.cost) for p in probes)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="metric")
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle="--", label="target")
    ax.set_xlabel("high-precision ratio")
    ax.set_ylabel("metric")
    costs = [p[2] for p in pts]
    if any(c is not None and math.isfinite(c) for c in costs):
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], costs, "s:", color="tab:gray", label="cost")
        ax2.set_ylabel("estimated cost")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("mixed-precision search", fontsize=9)
    return _png(fig)
