"""Tuning steps shared by ``stage=calibration`` (tuned recipes) and ``stage=pipeline``.

Thin adapters over ``qat_lightning.analysis``'s searches, turning their plans into what a
:class:`~qat_lightning.app.recipes.Recipe` stores (op names / ``(op, sensitive_type)`` rows):

* :func:`fp16_search`: the seed's int16/fp16 step (``search_fp16_topk``): the ops most sensitive under
  int16 get fp16 outputs, the fewest that reach the target;
* :func:`int16_search`: the seed's int8/int16 step (``search_mixed_precision``, binary search on the int16
  ratio) or, with ``gemm_only``, the J6P step (``search_j6p``: other ops fp16, gemm int8/int16).

Every probe is an evaluation only (node dtypes change, kept observer statistics give the scales); the
plans are written under the analysis directory (``mixed_precision.json`` / ``.txt`` / ``.png``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "SearchOutcome",
    "fp16_search",
    "int16_search",
    "load_sensitivity_table",
    "merged_table",
    "searched_rows",
]

log = logging.getLogger("qat_lightning")


@dataclass(frozen=True)
class SearchOutcome:
    """What a search chose and why.

    Attributes:
        chosen: fp16: op names; int16: ``(op_name, sensitive_type)`` rows raised.
        metric: the metric with that choice (``None`` when not evaluated: a fixed ratio / top-k).
        reached: whether the target was reached.
        probes: ``(size, metric)`` of every probe in order (size: k for fp16, the ratio for int16).
        ratio: the common int16 ratio found (int16 only).
        cost: the plan's estimated cost relative to all-low (``None`` if unknown).
    """

    chosen: tuple[Any, ...]
    metric: float | None
    reached: bool
    probes: tuple[tuple[float, float], ...] = ()
    ratio: float | None = None
    cost: float | None = None


def merged_table(tables: Sequence[Any]) -> Any:
    """One table holding every table's rows, interleaved by rank (the union, most sensitive first)."""
    from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

    if len(tables) == 1:
        return tables[0]
    rows: dict[tuple[str, str], Any] = {}
    for rank in range(max(len(t.rows) for t in tables)):
        for table in tables:
            if rank < len(table.rows):
                row = table.rows[rank]
                rows.setdefault((row.op_name, row.sensitive_type), row)
    first = tables[0]
    return SensitivityTable(tuple(rows.values()), first.metric_name, "merged", first.method)


def fp16_search(
    model: nn.Module,
    tables: Sequence[Any],
    eval_fn: Callable[[nn.Module], float],
    target: float,
    chip: str,
    max_ops: int,
    higher_is_better: bool = True,
    topk: int | None = None,
    out_dir: Path | None = None,
) -> SearchOutcome:
    """Run the int16 -> fp16 step on a calibrated all-int16 network (restored afterwards).

    Args:
        model: the calibrated int16 prepared network.
        tables: its sensitivity tables (activation rows count; several tables are merged by rank).
        eval_fn: ``eval_fn(model) -> metric``.
        target: the metric to reach.
        chip: the chip (must have fp16 ops).
        max_ops: the most ops moved to fp16 (``0``: none, no search).
        higher_is_better: the metric's direction.
        topk: a fixed number of ops instead of the search (no evaluation).
        out_dir: where the plan is written.
    """
    table = merged_table(tables)
    if topk is not None:
        names = [r.op_name for r in table.rows if r.sensitive_type == "activation"][:topk]
        return SearchOutcome(tuple(dict.fromkeys(names)), None, False)
    if max_ops < 1:  # pipeline.fp16_max=0: no fp16 step
        return SearchOutcome((), None, False)
    from qat_lightning.analysis import SearchReporter, search_fp16_topk

    reporter = SearchReporter(out_dir, "fp16_topk") if out_dir is not None else None
    plan = search_fp16_topk(
        model,
        table,
        eval_fn,
        target,
        max_k=max_ops,
        chip=chip,
        higher_is_better=higher_is_better,
        on_probe=reporter.probe if reporter is not None else None,
    )
    if reporter is not None:
        reporter.write(plan)
    probes = tuple((float(p.raised), float(p.metric)) for p in plan.probes)
    chosen = tuple(dict.fromkeys(op for op, _ in plan.raised))
    return SearchOutcome(chosen, float(plan.metric), bool(plan.reached), probes, None, _relative(plan))


def _relative(plan: Any) -> float | None:
    low = getattr(plan, "cost_low", None)
    return float(plan.cost) / float(low) if low else None


def int16_search(
    model: nn.Module,
    tables: Sequence[Any],
    eval_fn: Callable[[nn.Module], float],
    target: float,
    chip: str,
    gemm_only: bool = False,
    sensitive_type: str | None = None,
    cost_aware: bool = False,
    higher_is_better: bool = True,
    ratio: float | None = None,
    high: str = "qint16",
    out_dir: Path | None = None,
    reuse_activations: bool = False,
    cache_budget_mb: float = 1024.0,
) -> SearchOutcome:
    """Find the minimal int16 ratio reaching ``target``, or the rows of a fixed ``ratio``.

    The search runs inside :func:`qat_lightning.ptq.float_reference`: after ``ptq=`` a raised weight is the
    original float weight quantized at the higher precision (AdaRound's rounding is for the low dtype).

    Args:
        model: the calibrated low-precision network (left as it was).
        tables: sensitivity tables.
        eval_fn: ``eval_fn(model) -> metric``.
        target: the metric to reach.
        chip: the chip (its rules and cost model).
        gemm_only: the J6P path (``search_j6p``: other ops fp16, gemm rows only).
        sensitive_type: only ``activation`` / ``weight`` rows, ``None`` = both.
        cost_aware: keep high-FLOP ops in low precision first.
        higher_is_better: the metric's direction.
        ratio: a fixed share of each table's rows instead of the search (no evaluation): of the rows the
            search counts (:func:`searched_rows`), so the ratio a search reports gives back its rows.
        high: the dtype the rows are raised to.
        out_dir: where the plan is written.
        reuse_activations: probes rerun only the graph downstream of the changed ops (``SearchConfig``).
        cache_budget_mb: most megabytes of kept activations.
    """
    if ratio is not None:
        from qat_lightning.quant.qconfig.templates import SensitivityTemplate

        rows = searched_rows(model, tables, gemm_only)
        chosen = SensitivityTemplate(rows, ratio, sensitive_type, high).selected()
        return SearchOutcome(tuple(chosen), None, False, (), ratio)
    from qat_lightning.analysis import SearchReporter, search_j6p, search_mixed_precision
    from qat_lightning.ptq import float_reference

    reporter = SearchReporter(out_dir) if out_dir is not None else None
    common = {
        "cost_aware": cost_aware,
        "higher_is_better": higher_is_better,
        "on_probe": reporter.probe if reporter is not None else None,
        "reuse_activations": reuse_activations,
        "cache_budget_mb": cache_budget_mb,
    }
    # after ptq=, an op raised to int16 quantizes its float weight, not AdaRound's int8 rounding of it
    with float_reference(model):
        if gemm_only:
            plan = search_j6p(
                model, list(tables), eval_fn, target, chip=chip, sensitive_type=sensitive_type, **common
            )
        else:
            plan = search_mixed_precision(
                model,
                list(tables),
                eval_fn,
                target,
                high=high,
                chip=chip,
                sensitive_type=sensitive_type,
                **common,
            )
    if reporter is not None:
        reporter.write(plan)
    probes = tuple((float(p.ratio), float(p.metric)) for p in plan.probes)
    pairs = tuple((str(op), str(kind)) for op, kind in plan.raised)
    return SearchOutcome(
        pairs, float(plan.metric), bool(plan.reached), probes, float(plan.ratio), _relative(plan)
    )


def searched_rows(model: nn.Module, tables: Sequence[Any], gemm_only: bool) -> list[Any]:
    """Return each table with only the rows the int16 search counts (its ratio is a share of these).

    The search's own filter (:func:`~qat_lightning.analysis.search.mixed_precision.search_rows`): rows of
    ops in ``model``; with ``gemm_only`` (J6P: other ops stay float16, so raising them is a no-op) rows of
    gemm ops only (``is_gemm_op``, as ``search_j6p``).

    Args:
        model: the prepared network (its ops).
        tables: sensitivity tables.
        gemm_only: the J6P path.

    Raises:
        ValueError: when ``model`` is ``None`` (the rows cannot be matched to ops).
    """
    import dataclasses

    from qat_lightning.analysis.search.mixed_precision import search_rows
    from qat_lightning.analysis.search.precision_nodes import collect_ops
    from qat_lightning.analysis.search.precision_paths import is_gemm_op

    if model is None:
        raise ValueError("a fixed int16 ratio needs the prepared model to match the table's rows to its ops")
    ops, only = collect_ops(model), is_gemm_op if gemm_only else None
    return [dataclasses.replace(t, rows=tuple(search_rows(t, None, ops, only))) for t in tables]


def load_sensitivity_table(path: Path) -> Any:
    """Read a sensitivity table written by the analysis (``quant_analysis/sensitivity_<output>.json``).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a sensitivity table.
    """
    import dataclasses
    import json

    from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe.sensitivity_table={path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(
            f"{path} is not a sensitivity table (expected the JSON of quant_analysis/sensitivity_*.json)"
        )
    names = {f.name for f in dataclasses.fields(SensitivityRow)}
    rows = []
    for i, row in enumerate(data["rows"] if isinstance(data["rows"], list) else [data["rows"]]):
        try:
            rows.append(SensitivityRow(**{k: v for k, v in row.items() if k in names}))
        except (AttributeError, TypeError) as error:  # not an object, or a field missing
            raise ValueError(f"{path}: row {i} is not a sensitivity row ({error}): {row!r}") from error
    rows = tuple(rows)
    extra = {k: data[k] for k in ("metric_name", "output_name", "method") if k in data}
    return SensitivityTable(rows, **extra)
