"""Render the run summary: a table of :class:`StageResult` rows plus the decisions, as Markdown and rich.

Computing (the stages) and rendering (here) are separate: :func:`render_markdown` returns the text of
``summary.md``; :func:`render_table` returns a ``rich`` table for the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "StageResult", "Summary", "render_markdown", "render_table", "row_cells"]

COLUMNS = (
    "stage",
    "recipe",
    "metric",
    "% of float",
    "int16 ratio",
    "fp16 ratio",
    "float32 (not quantized)",
    "est. cost (x int8)",
    "note",
)


@dataclass(frozen=True)
class StageResult:
    """One row of the summary table.

    Attributes:
        step: what ran (``float``, ``calibration int8``, ``qat``, ...).
        recipe: the recipe name (``float`` for the float model).
        metric: the target metric on the validation data (``None`` if not measured).
        float_metric: the float model's metric, for the "% of float" column.
        int16_ratio: share of ops computing in int16 (``dtype_op_shares``; ``None``: not a quantized model).
        fp16_ratio: share of ops computing in float16 (``dtype_op_shares``; ``None``: not a quantized model).
        cost: estimated cost on the chip, relative to the same model all-int8 (``None`` for float).
        ckpt: the checkpoint written, if any.
        out_dir: where the step's files are.
        note: a short remark (decision, sanity status).
        float32_share: share of FLOPs in ops left float32 without quant points (``None`` for float).
    """

    step: str
    recipe: str
    metric: float | None
    float_metric: float | None = None
    int16_ratio: float | None = None
    fp16_ratio: float | None = None
    cost: float | None = None
    ckpt: Path | None = None
    out_dir: Path | None = None
    note: str = ""
    float32_share: float | None = None

    @property
    def share_of_float(self) -> float | None:
        """``metric / float_metric`` (``None`` when either is missing or the float metric is 0)."""
        if self.metric is None or not self.float_metric:
            return None
        return self.metric / self.float_metric


@dataclass(frozen=True)
class Summary:
    """Everything ``summary.md`` shows.

    Attributes:
        title: first heading.
        facts: ``name -> value`` lines under the title (chip, target, metric, wall time, ...).
        rows: one per stage / pipeline step, in order.
        decisions: what the pipeline decided and the numbers behind it, in order.
        files: ``path -> meaning`` of the files written.
    """

    title: str
    facts: Mapping[str, str] = field(default_factory=dict)
    rows: Sequence[StageResult] = ()
    decisions: Sequence[str] = ()
    files: Mapping[str, str] = field(default_factory=dict)


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def row_cells(row: StageResult) -> list[str]:
    """Format the table cells of one row."""
    share = row.share_of_float
    return [
        row.step,
        row.recipe,
        _num(row.metric),
        _num(None if share is None else 100 * share, "{:.2f}%"),
        _num(row.int16_ratio, "{:.1%}"),
        _num(row.fp16_ratio, "{:.1%}"),
        _num(row.float32_share, "{:.1%}"),
        _num(row.cost, "{:.2f}"),
        row.note,
    ]


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: Summary, relative_to: Path | None = None) -> str:
    """Render the text of ``summary.md``.

    Args:
        summary: what to show.
        relative_to: paths in ``files`` are shown relative to this directory.
    """
    lines = [f"# {summary.title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary.facts.items()]
    lines += ["", "## Results", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_escape(c) for c in row_cells(r)) + " |" for r in summary.rows]
    lines += [
        "",
        "metric: the target metric on the validation data; % of float: metric / float metric; int16 / fp16 "
        "ratio: share of ops computing in int16 / fp16 (a gemm: the widest of its inputs and weight; another "
        "op: its output dtype), as the dtype summary of model_check_result.txt and TensorBoard's "
        "quant/ratio_* count them; float32 (not quantized): share of FLOPs in ops prepare left without "
        "quant points (model_check_result.txt lists them); est. cost: the chip cost model (MACs x dtype "
        "factor, `qat_lightning.chips`) relative to the same model all-int8.",
    ]
    if summary.decisions:
        lines += ["", "## Decisions", ""]
        lines += [f"{i}. {d}" for i, d in enumerate(summary.decisions, 1)]
    if summary.files:
        lines += ["", "## Files", ""]
        for path, meaning in summary.files.items():
            shown = path
            if relative_to is not None:
                try:
                    shown = str(Path(path).relative_to(relative_to))
                except ValueError:
                    shown = path
            lines.append(f"- `{shown}`: {meaning}")
    return "\n".join(lines) + "\n"


def render_table(summary: Summary) -> Any:
    """Build a ``rich.table.Table`` of the rows (for the terminal)."""
    from rich.table import Table

    table = Table(title=summary.title, show_lines=False)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("stage", "recipe", "note") else "right")
    for row in summary.rows:
        table.add_row(*row_cells(row))
    return table
