"""Automatic mixed-precision search (the seed's int8/int16, int16/fp16 and J6P tuning procedures).

:func:`search_mixed_precision` executes the seed's int8/int16 procedure on a calibrated model:

1. probe ratio 0 (all ``low``) and ratio 1 (every row of every table raised to ``high``); if even ratio 1
   misses the target, stop: ``reached=False`` and the best probe found;
2. binary search on the *common* ratio (the same share of every table, union of each table's top rows,
   the seed's "binary ratio adjustment") for the smallest ratio that meets the target;
3. per-table reduction: each table's own share is binary-searched down in turn, the others fixed;
4. optional cost-aware step (``cost_aware=True``, the seed's "adjust based on computation cost"): the
   raised ops are tried back in ``low``, most FLOPs first, keeping each one that still meets the target.

Each probe is an evaluation only: node dtypes are changed in place (``fq.dtype = high``: scales are
recomputed from the observers' dtype-agnostic statistics, no recalibration), ``eval_fn(model)`` is
called with the model in eval mode and its nodes in VALIDATION, and every dtype and scale is restored.
The search assumes the metric does not get worse when more ops are raised (binary search); the probes
are all reported so a violation is visible.

The plan carries a ready :class:`~qat_lightning.quant.qconfig.setter.QconfigSetter`: ``base_templates``
plus one :class:`~qat_lightning.quant.qconfig.templates.SensitivityTemplate` over exactly the raised rows, with
the chip (``on_violation="downgrade"``, the rule the probes follow). Cost = ``chips.op_cost`` summed
over ops with their effective dtypes (``j6m`` prices when no chip is given).

The int16→fp16 step and the J6P path are in :mod:`qat_lightning.analysis.search.precision_paths`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from qat_lightning.analysis.reports import plan_text, probes_csv, to_json, write_atomic
from qat_lightning.analysis.reports.plots import search_png
from qat_lightning.analysis.search.precision_nodes import (
    DEFAULT_COST_CHIP,
    OpNodes,
    assignment_cost,
    collect_ops,
    raise_assignment,
)
from qat_lightning.analysis.state import analysis_mode, node_dtypes
from qat_lightning.chips import get_chip
from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES, SensitivityRow, SensitivityTable
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import (
    SensitivityTemplate,
    Template,
    precision_rank,
)

__all__ = ["Probe", "MixedPrecisionPlan", "search_mixed_precision", "write_plan"]


@dataclass(frozen=True)
class Probe:
    """One evaluation of the search.

    Attributes:
        stage: ``baseline``, ``all_high``, ``common``, ``per_table``, ``cost`` or ``fp16``.
        ratio: share of all table rows raised (the common ratio in stage ``common``).
        counts: rows raised per table.
        metric: what ``eval_fn`` returned.
        cost: estimated relative cost.
        raised: number of distinct rows raised.
        ok: whether the target was met.
    """

    stage: str
    ratio: float
    counts: tuple[int, ...]
    metric: float
    cost: float
    raised: int
    ok: bool


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """What a search found.

    Attributes:
        reached: whether the target was met (else the fields describe the best probe).
        ratio: the common ratio found (share of each table's rows), before per-table reduction.
        ratios: each table's final share.
        metric: the metric of the plan.
        target: the target metric.
        raised: ``(op_name, sensitive_type)`` rows set to ``high`` (in table order).
        low: the starting dtype; high: the raised dtype.
        cost: estimated cost of the plan; cost_low / cost_high: all-low / all-raised costs.
        probes: every evaluation, in order.
        setter: a ready ``QconfigSetter`` reproducing the plan with ``prepare``.
        chip: the chip the rules and prices came from (``None``: none; prices of ``j6m``).
        notes: chip downgrades and remarks.
    """

    reached: bool
    ratio: float
    ratios: tuple[float, ...]
    metric: float
    target: float
    raised: tuple[tuple[str, str], ...]
    low: str
    high: str
    cost: float
    cost_low: float
    cost_high: float
    probes: tuple[Probe, ...]
    setter: QconfigSetter | None = None
    chip: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


class _Search:
    """Shared probe machinery: assignments, evaluation, bookkeeping, progress files."""

    def __init__(
        self,
        model: nn.Module,
        eval_fn: Callable[[nn.Module], float],
        target: float,
        higher_is_better: bool,
        base: Mapping[FakeQuantize, QuantDtype],
        chip: str | None,
        out_dir: str | os.PathLike | None,
    ) -> None:
        self.model = model
        self.eval_fn = eval_fn
        self.target = target
        self.higher = higher_is_better
        self.ops = collect_ops(model)
        self.base = dict(base)
        self.chip = chip
        self.spec = get_chip(chip) if chip is not None else None
        self.probes: list[Probe] = []
        self.notes: list[str] = []
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cache: dict[tuple, tuple[float, float]] = {}

    def ok(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        return metric >= self.target if self.higher else metric <= self.target

    def better(self, a: float, b: float) -> bool:
        if math.isnan(b):
            return not math.isnan(a)
        return a > b if self.higher else a < b

    def assignment(self, rows: Sequence[tuple[str, str]], high: QuantDtype) -> dict[FakeQuantize, QuantDtype]:
        dtypes, notes = raise_assignment(list(rows), self.ops, high, self.base, self.spec)
        self.notes.extend(n for n in notes if n not in self.notes)
        return dtypes

    def evaluate(
        self,
        stage: str,
        rows: Sequence[tuple[str, str]],
        high: QuantDtype,
        ratio: float,
        counts: tuple[int, ...],
    ) -> Probe:
        dtypes = self.assignment(rows, high)
        key = tuple(sorted((id(n), d.name) for n, d in dtypes.items()))
        cached = self.cache.get(key)
        if cached is not None:
            metric, cost = cached
            return Probe(stage, ratio, counts, metric, cost, len(set(rows)), self.ok(metric))
        cost = assignment_cost(self.ops, dtypes, self.chip)
        with node_dtypes(dtypes), analysis_mode(self.model):
            metric = float(self.eval_fn(self.model))
        self.cache[key] = (metric, cost)
        probe = Probe(stage, ratio, counts, metric, cost, len(set(rows)), self.ok(metric))
        self.probes.append(probe)
        self._progress()
        return probe

    def _progress(self) -> None:
        if self.out_dir is not None:
            write_atomic(self.out_dir / "mixed_precision_probes.json", to_json(self.probes))


def _as_tables(tables: SensitivityTable | Sequence[SensitivityTable]) -> list[SensitivityTable]:
    items = [tables] if isinstance(tables, SensitivityTable) else list(tables)
    if not items or not all(isinstance(t, SensitivityTable) for t in items):
        raise ValueError(
            "tables must be a SensitivityTable or a non-empty list of them (from qa.sensitivity())"
        )
    return items


def _rows(
    table: SensitivityTable,
    sensitive_type: str | None,
    ops: Mapping[str, OpNodes],
    only: Callable[[OpNodes], bool] | None,
) -> list[SensitivityRow]:
    return [
        r
        for r in table.rows
        if (sensitive_type is None or r.sensitive_type == sensitive_type)
        and r.op_name in ops
        and (only is None or only(ops[r.op_name]))
    ]


def _union(per_table: list[list[SensitivityRow]], counts: Sequence[int]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for rows, k in zip(per_table, counts, strict=True):
        for r in rows[:k]:
            seen.setdefault((r.op_name, r.sensitive_type), None)
    return list(seen)


def _count(n: int, ratio: float) -> int:
    return min(n, math.ceil(ratio * n - 1e-9))


def search_mixed_precision(
    model: nn.Module,
    tables: SensitivityTable | Sequence[SensitivityTable],
    eval_fn: Callable[[nn.Module], float],
    target: float,
    low: DtypeLike = qint8,
    high: DtypeLike = qint16,
    chip: str | None = None,
    cost_aware: bool = False,
    higher_is_better: bool = True,
    sensitive_type: str | None = None,
    base_dtypes: Mapping[FakeQuantize, DtypeLike] | None = None,
    base_templates: Sequence[Template] = (),
    reference_qconfig: QConfig | None = None,
    max_cost_probes: int | None = None,
    out_dir: str | os.PathLike | None = None,
    op_filter: Callable[[OpNodes], bool] | None = None,
) -> MixedPrecisionPlan:
    """Find the smallest share of sensitive ops in ``high`` that meets ``target`` (module docstring).

    Args:
        model: the calibrated prepared model (its ops start in ``low``); left as it was.
        tables: one sensitivity table or a list (one per output); rows most sensitive first.
        eval_fn: ``eval_fn(model) -> float``, e.g. accuracy on a validation set.
        target: the metric to reach, e.g. ``0.99 * float_score``.
        low: the starting precision (informational; the model's own dtypes are the start).
        high: the precision raised rows get.
        chip: ``j6e``/``j6m``/``j6p`` for chip rules (no double int16 gemm on j6e/j6m) and prices.
        cost_aware: after the ratio search, try the raised ops back in ``low``, most FLOPs first.
        higher_is_better: ``False`` when the metric is an error (target is an upper bound).
        sensitive_type: use only ``activation`` or ``weight`` rows (``None``: both).
        base_dtypes: node dtypes applied under every probe (e.g. fp16 outputs, see :func:`search_j6p`).
        base_templates: templates reproducing ``base_dtypes`` in the plan's setter.
        reference_qconfig: the setter's reference qconfig (default ``get_qconfig(weight_dtype=low,
            out_dtype=low)``).
        max_cost_probes: at most this many probes in the cost-aware step (default: all raised ops).
        out_dir: when given, probes are written to ``mixed_precision_probes.json`` after every probe, and
            the plan to ``mixed_precision.json`` / ``.txt`` / ``_probes.csv`` / ``.png`` at the end.
        op_filter: keep only table rows whose op passes (``search_j6p``: gemm ops only).

    Raises:
        ValueError: for bad tables, dtypes, types or chip names.
    """
    tabs = _as_tables(tables)
    low_d, high_d = parse_dtype(low), parse_dtype(high)
    if precision_rank(high_d) <= precision_rank(low_d):
        raise ValueError(f"high ({high_d}) must be a higher precision than low ({low_d})")
    if sensitive_type is not None and sensitive_type not in SENSITIVE_TYPES:
        raise ValueError(
            f"unknown sensitive_type {sensitive_type!r}; allowed: None, {', '.join(SENSITIVE_TYPES)}"
        )
    base = {node: parse_dtype(d) for node, d in (base_dtypes or {}).items()}
    s = _Search(model, eval_fn, target, higher_is_better, base, chip, out_dir)
    per_table = [_rows(t, sensitive_type, s.ops, op_filter) for t in tabs]
    sizes = [len(r) for r in per_table]
    total_rows = max(len(_union(per_table, sizes)), 1)

    def probe(stage: str, counts: Sequence[int]) -> Probe:
        rows = _union(per_table, counts)
        return s.evaluate(stage, rows, high_d, len(rows) / total_rows, tuple(counts))

    zero = [0] * len(tabs)
    first = probe("baseline", zero)
    best_counts, best = list(zero), first
    if not first.ok:
        full = probe("all_high", sizes)
        if not full.ok:
            best_counts, best = (sizes, full) if s.better(full.metric, first.metric) else (zero, first)
            return _finish(
                s,
                tabs,
                per_table,
                best_counts,
                best,
                1.0,
                False,
                low_d,
                high_d,
                base_templates,
                reference_qconfig,
                zero,
                sizes,
            )
        # binary search on the common ratio over the grid k / N (N = largest table)
        n_max = max(sizes)
        lo, hi = 0, n_max
        found = full
        while hi - lo > 1:
            mid = (lo + hi) // 2
            p = probe("common", [_count(n, mid / n_max) for n in sizes])
            if p.ok:
                hi, found = mid, p
            else:
                lo = mid
        common = hi / n_max
        best_counts = [_count(n, common) for n in sizes]
        best = found
        # per-table reduction
        if len(tabs) > 1:
            for t in range(len(tabs)):
                lo_t, hi_t = 0, best_counts[t]
                while hi_t - lo_t > 0:
                    mid = (lo_t + hi_t) // 2
                    trial = list(best_counts)
                    trial[t] = mid
                    p = probe("per_table", trial)
                    if p.ok:
                        hi_t, best = mid, p
                    else:
                        lo_t = mid + 1
                best_counts[t] = hi_t
    else:
        common = 0.0
    plan_rows = _union(per_table, best_counts)
    if cost_aware and best.ok and plan_rows:
        flops = {name: op.info.flops for name, op in s.ops.items()}
        order = sorted(plan_rows, key=lambda r: -flops.get(r[0], 0))
        budget = len(order) if max_cost_probes is None else max_cost_probes
        kept = list(plan_rows)
        for row in order[:budget]:
            if flops.get(row[0], 0) <= 0:
                continue
            trial = [r for r in kept if r != row]
            p = s.evaluate("cost", trial, high_d, len(trial) / total_rows, tuple(best_counts))
            if p.ok:
                kept, best = trial, p
        plan_rows = kept
    return _finish(
        s,
        tabs,
        per_table,
        best_counts,
        best,
        common,
        best.ok,
        low_d,
        high_d,
        base_templates,
        reference_qconfig,
        zero,
        sizes,
        rows=plan_rows,
    )


def _finish(
    s: _Search,
    tabs: list[SensitivityTable],
    per_table: list[list[SensitivityRow]],
    counts: list[int],
    best: Probe,
    common: float,
    reached: bool,
    low: QuantDtype,
    high: QuantDtype,
    base_templates: Sequence[Template],
    reference: QConfig | None,
    zero: list[int],
    sizes: list[int],
    rows: list[tuple[str, str]] | None = None,
) -> MixedPrecisionPlan:
    chosen = rows if rows is not None else _union(per_table, counts)
    by_key = {(r.op_name, r.sensitive_type): r for t in per_table for r in t}
    table = SensitivityTable(tuple(by_key[k] for k in chosen), tabs[0].metric_name, "plan", tabs[0].method)
    templates = list(base_templates)
    if chosen:
        templates.append(SensitivityTemplate(table, topk_or_ratio=len(chosen), high_dtype=high))
    setter = QconfigSetter(
        reference_qconfig=reference or get_qconfig(weight_dtype=low, out_dtype=low),
        templates=templates,
        chip=s.chip,
        on_violation="downgrade",
    )
    cost_low = assignment_cost(s.ops, s.assignment([], high), s.chip)
    cost_high = assignment_cost(s.ops, s.assignment(_union(per_table, sizes), high), s.chip)
    notes = list(s.notes)
    if s.chip is None:
        notes.append(f"costs priced as {DEFAULT_COST_CHIP} (no chip given)")
    if not reached:
        notes.append(f"target {s.target:g} not reached: best probe {best.stage} with metric {best.metric:g}")
    plan = MixedPrecisionPlan(
        reached=reached,
        ratio=common,
        ratios=tuple(c / n if n else 0.0 for c, n in zip(counts, sizes, strict=True)),
        metric=best.metric,
        target=s.target,
        raised=tuple(chosen),
        low=low.name,
        high=high.name,
        cost=best.cost,
        cost_low=cost_low,
        cost_high=cost_high,
        probes=tuple(s.probes),
        setter=setter,
        chip=s.chip,
        notes=tuple(notes),
    )
    if s.out_dir is not None:
        write_plan(plan, s.out_dir)
    return plan


def write_plan(plan: MixedPrecisionPlan, out_dir: str | os.PathLike, stem: str = "mixed_precision") -> None:
    """Write ``<stem>.txt``, ``<stem>_probes.csv``, ``<stem>.json`` and ``<stem>.png`` for a plan."""
    out = Path(out_dir)
    write_atomic(out / f"{stem}.txt", plan_text(plan))
    write_atomic(out / f"{stem}_probes.csv", probes_csv(plan.probes))
    write_atomic(out / f"{stem}.json", to_json({k: v for k, v in vars(plan).items() if k != "setter"}))
    write_atomic(out / f"{stem}.png", search_png(plan.probes, plan.target))
