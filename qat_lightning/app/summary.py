"""Render the run summary: a table of :class:`StageResult` rows plus the decisions, as Markdown and rich.

Computing (the stages) and rendering (here) are separate: :func:`render_markdown` returns the text of
``summary.md``; :func:`render_table` returns a ``rich`` table for the terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qat_lightning.app.session import StageResult

__all__ = ["COLUMNS", "Summary", "render_markdown", "render_table", "row_cells"]

COLUMNS = (
    "stage",
    "recipe",
    "metric",
    "% of float",
    "int16 ratio",
    "fp16 ratio",
    "est. cost (x int8)",
    "note",
)


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
        "ratio: share of quantized ops with an int16 / fp16 quant point (input, weight or output; an op can "
        "count in both); est. cost: the chip cost model (MACs x dtype factor, `qat_lightning.chips`) "
        "relative to the same model all-int8.",
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
