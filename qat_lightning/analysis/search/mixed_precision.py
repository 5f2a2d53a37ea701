"""Automatic mixed-precision search (the seed's int8/int16, int16/fp16 and J6P tuning procedures).

:func:`search_mixed_precision` executes the seed's int8/int16 procedure on a calibrated model:

1. probe ratio 0 (all ``low``) and ratio 1 (every row of every table raised to ``high``); if even ratio 1
   misses the target, stop: ``reached=False`` and the best probe found;
2. search on the *common* ratio (the same share of every table, union of each table's top rows, the
   seed's "binary ratio adjustment") for the smallest ratio that meets the target;
3. per-table reduction: each table's own share is searched down in turn, the others fixed;
4. optional cost-aware step (``cost_aware=True``, the seed's "adjust based on computation cost"): the
   raised ops are tried back in ``low``, most FLOPs first, keeping each one that still meets the target.

``plan.ratios`` are each table's final share: the rows of the table's own top rows (its count after step
3) that the plan still raises, over the rows the search counts in that table (:func:`search_rows`).
Without the cost step the plan is exactly the union of each table's top rows, so one
``SensitivityTemplate(table, topk_or_ratio=ratio)`` per table (over the counted rows) reproduces it. The
cost step removes rows by FLOPs, not by sensitivity, so its plan is in general no top-k of any table: the
ratio is still the final share, but a template fed it raises the table's top rows instead, not the plan's;
``plan.setter`` (a template over exactly ``plan.raised``) is what reproduces the plan. A share of 1.0 is
``len(rows)`` as a template count (a template reads ``topk_or_ratio=1.0`` as one row).

``plan.notes`` lists the chip downgrades of the plan's own assignment (those a ``prepare`` with
``plan.setter`` logs in ``prepare_record.changelog``, beyond the ones the model was prepared with), then
the search's remarks; the probes' downgrades on the way are not the plan's.

Steps 2 and 3 look for the smallest count that meets the target between a failing and a passing one
(:func:`~qat_lightning.analysis.search.probes.smallest_ok`): ``method="exact"`` bisects;
``method="fast"`` (the default) first predicts the boundary from the tables' own first-order numbers
(:class:`~qat_lightning.analysis.search.probes.FirstOrderGuess`) and verifies only the counts around
the prediction, then probes the point below that bisection would look at (one probe more; if it passes,
the metric is not monotone, the search goes on below and a plan note says so). Both find the same
counts, hence the same plan, whenever the metric does not get worse when more rows are raised (which
the bisection assumes too); the probes are all reported so a violation is visible.

A metric such as held-out accuracy with a margin of a few samples is not monotone, and there the
guessed search can settle far above bisection (a failing probe just below the target is trusted as a
bound). So the fast search distrusts its result, and also follows bisection's own path over the same
range, keeping the smaller count, when either rule holds (both read only the probes of that boundary
search):

* **not monotone**: some count passed below a failing one;
* **guess off**: the first guess and the count found, both counted from the range start, differ by
  more than a factor :data:`~qat_lightning.analysis.search.probes.GUESS_FACTOR` (2): the first-order
  model did not predict this metric.

Counts already probed cost nothing, and bisection's path is cut as soon as it could only end at the
count found or above, so it costs at most bisection's probes and often far fewer. Where it runs, the
count found is never above the exact search's on the same range; a plan note (``followed bisection's
path too``) gives the rule and the rows before and after. Where neither rule holds (every monotone
metric whose first guess is within a factor 2, e.g. the benchmarks' cosine metrics) nothing changes.

Each probe is an evaluation only: node dtypes are changed in place (``fq.dtype = high``: scales are
recomputed from the observers' dtype-agnostic statistics, no recalibration), ``eval_fn(model)`` is
called with the model in eval mode and its nodes in VALIDATION, and every dtype and scale is restored.

Inputs are checked before the first probe: the model must be prepared and calibrated (else a
``ValueError``, or the ``UncalibratedModelError`` ``QuantAnalysis`` raises), the target finite, and the
tables' rows must name ops of the model (rows naming no op are listed in a warning; if none does, a
``ValueError``). ``eval_fn`` must return a number: a NaN raises a ``ValueError`` naming the probe (the
model restored) instead of counting as a failing probe, since a NaN can be neither compared with the
target nor ranked, and a plan built around it would be meaningless.

The plan carries a ready :class:`~qat_lightning.quant.qconfig.setter.QconfigSetter`: ``base_templates``
plus one :class:`~qat_lightning.quant.qconfig.templates.SensitivityTemplate` over exactly the raised rows,
with the chip (``on_violation="downgrade"``, the rule the probes follow). Cost = ``chips.op_cost`` summed
over ops with their effective dtypes (``j6m`` prices when no chip is given).

The search computes and writes nothing; files come from
:class:`~qat_lightning.analysis.search.report.SearchReporter` (``on_probe=reporter.probe``, then
``reporter.write(plan)``). The int16→fp16 step and the J6P path are in
:mod:`qat_lightning.analysis.search.precision_paths`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from qat_lightning.analysis.checks import check_number, check_table_names, require_searchable
from qat_lightning.analysis.search.config import SEARCH_METHODS, SearchConfig, _config
from qat_lightning.analysis.search.precision_nodes import (
    DEFAULT_COST_CHIP,
    OpNodes,
    assignment_cost,
)
from qat_lightning.analysis.search.probe_cache import ActivationReuse
from qat_lightning.analysis.search.probes import FirstOrderGuess, ProbeRunner, smallest_ok
from qat_lightning.analysis.search.report import SearchReporter, write_plan
from qat_lightning.analysis.search.result import MixedPrecisionPlan, Probe
from qat_lightning.quant.dtypes import QuantDtype, parse_dtype
from qat_lightning.quant.qconfig.qconfig import get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import (
    SensitivityTemplate,
)

__all__ = [
    "SEARCH_METHODS",
    "Probe",
    "MixedPrecisionPlan",
    "SearchConfig",
    "SearchReporter",
    "search_mixed_precision",
    "search_rows",
    "write_plan",
]

Row = tuple[str, str]


def _as_tables(tables: SensitivityTable | Sequence[SensitivityTable]) -> list[SensitivityTable]:
    items = [tables] if isinstance(tables, SensitivityTable) else list(tables)
    if not items or not all(isinstance(t, SensitivityTable) for t in items):
        raise ValueError(
            "tables must be a SensitivityTable or a non-empty list of them (from qa.sensitivity())"
        )
    return items


def search_rows(
    table: SensitivityTable,
    sensitive_type: str | None,
    ops: Mapping[str, OpNodes],
    only: Callable[[OpNodes], bool] | None,
) -> list[SensitivityRow]:
    """Return the rows of ``table`` the search counts.

    Those of ``sensitive_type`` (``None``: both), of ops in ``ops`` that pass ``only``, except rows whose
    nodes the user left in FLOAT (partial quantization: raising them changes nothing,
    :meth:`~qat_lightning.analysis.search.precision_nodes.OpNodes.is_float_row`): a ratio is a share of
    these rows (a fixed ``int16_ratio`` counts the same ones).
    """
    return [
        r
        for r in table.rows
        if (sensitive_type is None or r.sensitive_type == sensitive_type)
        and r.op_name in ops
        and not ops[r.op_name].is_float_row(r.sensitive_type)
        and (only is None or only(ops[r.op_name]))
    ]


def _union(per_table: list[list[SensitivityRow]], counts: Sequence[int]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for rows, k in zip(per_table, counts, strict=True):
        for r in rows[:k]:
            seen.setdefault((r.op_name, r.sensitive_type), None)
    return list(seen)


def _kept_counts(
    per_table: list[list[SensitivityRow]], counts: Sequence[int], rows: Sequence[Row]
) -> list[int]:
    """Per table: how many of its top ``counts`` rows ``rows`` raise (fewer after the cost step)."""
    kept = set(rows)
    return [
        sum((r.op_name, r.sensitive_type) in kept for r in table[:k])
        for table, k in zip(per_table, counts, strict=True)
    ]


def _count(n: int, ratio: float) -> int:
    return min(n, math.ceil(ratio * n - 1e-9))


class _Stages:
    """The search's steps over one set of tables (module docstring), sharing a :class:`ProbeRunner`."""

    def __init__(self, runner: ProbeRunner, per_table: list[list[SensitivityRow]], high: QuantDtype) -> None:
        self.s = runner
        self.per_table = per_table
        self.high = high
        self.sizes = [len(r) for r in per_table]
        self.total = max(len(_union(per_table, self.sizes)), 1)
        self.guess: FirstOrderGuess | None = None

    def probe(self, stage: str, counts: Sequence[int]) -> Probe:
        rows = _union(self.per_table, counts)
        probe = self.s.evaluate(stage, rows, self.high, len(rows) / self.total, tuple(counts))
        if self.guess is not None:
            self.guess.observe(rows, probe.metric)
        return probe

    def boundary(
        self, stage: str, lo: int, hi: int, counts_at: Callable[[int], list[int]]
    ) -> tuple[int, Probe | None]:
        """Return the smallest ``k`` in ``(lo, hi]`` meeting the target and its probe (``None``: ``hi``'s)."""
        seen: dict[int, Probe] = {}

        def ok_at(k: int) -> bool:
            seen[k] = self.probe(stage, counts_at(k))
            return seen[k].ok

        guess = self.guess
        predict = None
        if guess is not None:

            def predict(a: int, b: int) -> int:
                return guess.first(a, b, lambda k: _union(self.per_table, counts_at(k)), self.s.ok)

        followed: list[str] = []

        def report(reason: str, guessed: int, found: int) -> None:
            rows = [len(_union(self.per_table, counts_at(c))) for c in (guessed, found)]
            followed.append(
                f"{stage}: {reason}; the fast search followed bisection's path too: "
                f"{rows[0]} rows raised -> {rows[1]}"
            )

        k = smallest_ok(lo, hi, ok_at, predict, report)
        self.note_non_monotone(
            stage, seen, "" if followed else "; the fast search checked below and went on there"
        )
        self.s.notes.extend(followed)
        return k, seen.get(k)

    def note_non_monotone(self, stage: str, seen: Mapping[int, Probe], tail: str) -> None:
        """Add a plan note (ending in ``tail``) when a count passed below a failing one (fast search only)."""
        passes = [p for _, p in sorted(seen.items()) if p.ok]
        fails = [p for _, p in sorted(seen.items()) if not p.ok]
        if passes and fails and passes[0].raised < fails[-1].raised:
            a, b = passes[0], fails[-1]
            self.s.notes.append(
                f"{stage}: metric not monotone in the rows raised: {a.raised} rows pass ({a.metric:g}) "
                f"but {b.raised} fail ({b.metric:g}){tail}"
            )

    def common(self, full: Probe) -> tuple[list[int], Probe, float]:
        """Step 2 on the grid ``k / N`` (``N`` = largest table): counts, their probe, the common ratio."""
        n_max = max(self.sizes)

        def counts_at(k: int) -> list[int]:
            return [_count(n, k / n_max) for n in self.sizes]

        k, found = self.boundary("common", 0, n_max, counts_at)
        return counts_at(k), found or full, k / n_max

    def per_table_step(self, counts: list[int], best: Probe) -> tuple[list[int], Probe]:
        """Step 3: each table's count searched down in turn, the others fixed."""
        counts = list(counts)
        for t in range(len(counts)):

            def counts_at(c: int, t: int = t) -> list[int]:
                return [c if i == t else n for i, n in enumerate(counts)]

            k, found = self.boundary("per_table", -1, counts[t], counts_at)
            counts[t], best = k, found or best
        return counts, best

    def cost_step(
        self, rows: list[Row], best: Probe, counts: list[int], budget: int | None
    ) -> tuple[list[Row], Probe]:
        """Step 4: raised ops tried back in ``low``, most FLOPs first."""
        flops = {name: op.info.flops for name, op in self.s.ops.items()}
        order = sorted(rows, key=lambda r: -flops.get(r[0], 0))
        kept = list(rows)
        for row in order[: len(order) if budget is None else budget]:
            if flops.get(row[0], 0) <= 0:
                continue
            trial = [r for r in kept if r != row]
            left = tuple(_kept_counts(self.per_table, counts, trial))
            p = self.s.evaluate("cost", trial, self.high, len(trial) / self.total, left)
            if p.ok:
                kept, best = trial, p
        return kept, best


def search_mixed_precision(
    model: nn.Module,
    tables: SensitivityTable | Sequence[SensitivityTable],
    eval_fn: Callable[[nn.Module], float],
    target: float,
    config: SearchConfig | None = None,
    *,
    on_probe: Callable[[Probe], None] | None = None,
    **options: Any,
) -> MixedPrecisionPlan:
    """Find the smallest share of sensitive ops in ``high`` that meets ``target`` (module docstring).

    Args:
        model: the calibrated prepared model (its ops start in ``low``); left as it was.
        tables: one sensitivity table or a list (one per output); rows most sensitive first.
        eval_fn: ``eval_fn(model) -> float``, e.g. accuracy on a validation set.
        target: the metric to reach, e.g. ``0.99 * float_score``.
        config: the options (:class:`SearchConfig`); default ``SearchConfig()``.
        on_probe: called with every new probe (e.g. ``SearchReporter(out_dir).probe``).
        options: :class:`SearchConfig` fields overriding ``config`` (``chip="j6m"``, ``method="exact"``).

    Raises:
        TypeError: for an unknown option, a model that is not a module, a target or an ``eval_fn``
            value that is not a number.
        ValueError: for bad tables (rows of which none names an op of the model; rows naming no op
            only warn), dtypes, types, methods or chip names, a target that is not finite, a model
            without quant nodes (not prepared), or an ``eval_fn`` that returns NaN (the error names the
            probe; the model is restored).
        UncalibratedModelError: for a model that was never calibrated.
    """
    who = "search_mixed_precision"
    require_searchable(model, who, eval_fn)
    target = check_number("target", target, who)  # type: ignore[assignment]
    cfg = _config(config, options)
    tabs = _as_tables(tables)
    high_d = parse_dtype(cfg.high)
    base = {node: parse_dtype(d) for node, d in (cfg.base_dtypes or {}).items()}
    reuse = None
    if cfg.reuse_activations:
        reuse = ActivationReuse(model, cfg.cache_budget_mb, cfg.cache_reference)
    s = ProbeRunner(model, eval_fn, target, cfg.higher_is_better, base, cfg.chip, on_probe, reuse)
    check_table_names(tabs, s.ops, who)
    per_table = [search_rows(t, cfg.sensitive_type, s.ops, cfg.op_filter) for t in tabs]
    st = _Stages(s, per_table, high_d)
    zero = [0] * len(tabs)
    first = st.probe("baseline", zero)
    if first.ok:
        return _finish(st, tabs, cfg, zero, first, 0.0, [])
    full = st.probe("all_high", st.sizes)
    if not full.ok:
        counts, best = (st.sizes, full) if s.better(full.metric, first.metric) else (zero, first)
        ratio = 1.0 if counts is st.sizes else 0.0  # the share raised: none when the baseline is kept
        return _finish(st, tabs, cfg, counts, best, ratio, _union(per_table, counts), reached=False)
    if cfg.method == "fast":
        st.guess = FirstOrderGuess(tabs, per_table)
        st.guess.observe([], first.metric)
        st.guess.observe(_union(per_table, st.sizes), full.metric)
    counts, best, common = st.common(full)
    if len(tabs) > 1:
        counts, best = st.per_table_step(counts, best)
    rows = _union(per_table, counts)
    if cfg.cost_aware and best.ok and rows:
        rows, best = st.cost_step(rows, best, counts, cfg.max_cost_probes)
    return _finish(st, tabs, cfg, counts, best, common, rows)


def _finish(
    st: _Stages,
    tabs: list[SensitivityTable],
    cfg: SearchConfig,
    counts: list[int],
    best: Probe,
    common: float,
    chosen: list[Row],
    reached: bool = True,
) -> MixedPrecisionPlan:
    s, low, high = st.s, parse_dtype(cfg.low), st.high
    by_key = {(r.op_name, r.sensitive_type): r for t in st.per_table for r in t}
    table = SensitivityTable(tuple(by_key[k] for k in chosen), tabs[0].metric_name, "plan", tabs[0].method)
    templates = list(cfg.base_templates)
    if chosen:
        templates.append(SensitivityTemplate(table, topk_or_ratio=len(chosen), high_dtype=high))
    setter = QconfigSetter(
        reference_qconfig=cfg.reference_qconfig or get_qconfig(weight_dtype=low, out_dtype=low),
        templates=templates,
        chip=s.chip,
        on_violation="downgrade",
    )
    cost_low = assignment_cost(s.ops, s.assignment([], high), s.chip)
    cost_high = assignment_cost(s.ops, s.assignment(_union(st.per_table, st.sizes), high), s.chip)
    notes = [*s.assignment_notes(chosen, high), *s.notes]  # the plan's own downgrades, then remarks
    if s.reuse is not None:
        notes.append(s.reuse.note())
    if s.chip is None:
        notes.append(f"costs priced as {DEFAULT_COST_CHIP} (no chip given)")
    if not reached:
        notes.append(f"target {s.target:g} not reached: best probe {best.stage} with metric {best.metric:g}")
    return MixedPrecisionPlan(
        reached=reached,
        ratio=common,
        ratios=tuple(
            c / n if n else 0.0
            for c, n in zip(_kept_counts(st.per_table, counts, chosen), st.sizes, strict=True)
        ),
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
        method=cfg.method,
    )
