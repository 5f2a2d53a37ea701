"""The seed's other mixed-precision procedures, on top of :mod:`.mixed_precision` (same package).

* :func:`search_fp16_topk`: the int16→fp16 step ("set a small number of fp16 based on the int16
  sensitivity results"): the top-k activation rows of an int16 sensitivity table get float16 outputs,
  k = 1, 2, ... until the target is met;
* :func:`search_j6p`: the J6P path: every op output float16 (fast on J6P), gemm inputs and weights
  searched between qint8 and qint16 (double int16 allowed), starting from :func:`j6p_base_dtypes`.

Probes change node dtypes in place and restore them, like :func:`search_mixed_precision`; nothing is
written (files: :class:`~qat_lightning.analysis.search.report.SearchReporter`, stem ``fp16_topk`` for the
fp16 step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from qat_lightning.analysis.checks import (
    check_bool,
    check_count,
    check_number,
    check_table_names,
    require_searchable,
)
from qat_lightning.analysis.search.mixed_precision import search_mixed_precision
from qat_lightning.analysis.search.precision_nodes import OpNodes, assignment_cost, collect_ops
from qat_lightning.analysis.search.probes import ProbeRunner
from qat_lightning.analysis.search.result import MixedPrecisionPlan, Probe
from qat_lightning.chips import get_chip
from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, float16, parse_dtype, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import OpKind
from qat_lightning.quant.qconfig.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import (
    ConvDtypeTemplate,
    MatmulDtypeTemplate,
    ModuleNameTemplate,
    Template,
)

__all__ = ["is_gemm_op", "search_fp16_topk", "j6p_base_dtypes", "search_j6p"]


def is_gemm_op(op: OpNodes) -> bool:
    """Whether ``op`` is a gemm (``search_j6p`` counts only these rows: other ops stay float16 on J6P)."""
    return op.info.kind is OpKind.GEMM


def _fp16_candidate(op: OpNodes | None) -> bool:
    """Whether an op of the model has an output node the user did not leave in FLOAT."""
    return op is not None and op.output is not None and op.output not in op.disabled


def _check_fp16_args(
    model: Any, table: Any, eval_fn: Any, target: Any, max_k: Any, higher_is_better: Any
) -> float:
    """Validate :func:`search_fp16_topk`'s arguments where they arrive; return the target as a float."""
    who = "search_fp16_topk"
    require_searchable(model, who, eval_fn)
    if not isinstance(table, SensitivityTable):
        hint = "; pick one, e.g. tables[0] (the output the target is measured on)"
        raise TypeError(
            f"{who}: table must be one SensitivityTable (an int16 sensitivity table of one output), "
            f"got {type(table).__name__}{hint if isinstance(table, (list, tuple)) else ''}"
        )
    check_count("max_k", max_k, who)
    check_bool("higher_is_better", higher_is_better, who)
    return float(check_number("target", target, who))  # type: ignore[arg-type]


def search_fp16_topk(
    model: nn.Module,
    table: SensitivityTable,
    eval_fn: Callable[[nn.Module], float],
    target: float,
    max_k: int = 5,
    chip: str | None = None,
    higher_is_better: bool = True,
    base_templates: Sequence[Template] = (),
    reference_qconfig: QConfig | None = None,
    on_probe: Callable[[Probe], None] | None = None,
) -> MixedPrecisionPlan:
    """Run the int16→fp16 step: top-k ops of an int16 sensitivity table to float16, k = 1..max_k.

    Only ``activation`` rows count (an op's output becomes float16), of ops whose output node is not left
    in FLOAT by the user (partial quantization). With a chip, each probe follows the
    chip's rules as the setter applies them: a gemm input left as produced that would read a float16
    output (no chip runs a float16 gemm) is probed in qint16, as ``plan.setter`` builds it.
    The all-int16 model (k = 0, stage ``baseline``) is probed first: if it meets the target no op is moved.
    Stops at the first k that meets the target; when none does (``reached=False`` after ``max_k``), the
    best k is kept only if it beats the all-int16 metric strictly, else no op is moved (an fp16 op that
    does not help only costs speed). The setter is ``reference`` (default all-int16 activations, int8
    weights) + ``ModuleNameTemplate`` mapping the chosen ops to float16. ``on_probe`` is called with every
    probe. The plan's notes list the chip downgrades of the chosen assignment only (not of the probes).

    Raises:
        TypeError: for a list of tables (pass one), a non-int ``max_k``, a non-bool ``higher_is_better``,
            a target or an ``eval_fn`` value that is not a number.
        ValueError: for ``max_k < 1``, a chip without float16 ops, and as :func:`search_mixed_precision`
            (target, model without quant nodes, a table of another model, ``eval_fn`` returning NaN).
        UncalibratedModelError: for a model that was never calibrated.
    """
    target = _check_fp16_args(model, table, eval_fn, target, max_k, higher_is_better)
    if chip is not None and "float16" not in get_chip(chip).other_dtypes:
        raise ValueError(f"chip {chip} has no float16 ops")
    s = ProbeRunner(model, eval_fn, target, higher_is_better, {}, chip, on_probe)
    check_table_names([table], s.ops, "search_fp16_topk")
    acts = [r for r in table.rows if r.sensitive_type == "activation"]
    rows = [r for r in acts if _fp16_candidate(s.ops.get(r.op_name))][:max_k]
    if not rows:
        raise ValueError("the table has no activation row of an op this model quantizes (FLOAT ops skipped)")
    best = s.measure("baseline", s.follow_chip({}), 0.0, (0,), 0)  # all-int16: what fp16 ops must beat
    chosen: list[str] = []
    for k in range(1, len(rows) + 1):
        if best.ok:
            break
        names = [r.op_name for r in rows[:k]]
        dtypes = s.follow_chip({s.ops[n].output: float16 for n in names})
        p = s.measure("fp16", dtypes, k / max(len(table.rows), 1), (k,), k)
        if p.ok or s.better(p.metric, best.metric):
            best, chosen = p, names
    all_fp16 = {s.ops[r.op_name].output: float16 for r in rows}
    _, downgrades = s.chip_rules({s.ops[n].output: float16 for n in chosen})  # the plan's own
    setter = QconfigSetter(
        reference_qconfig=reference_qconfig or get_qconfig(weight_dtype=qint8, out_dtype=qint16),
        templates=[*base_templates, ModuleNameTemplate({n: float16 for n in chosen})],
        chip=chip,
        on_violation="downgrade",
    )
    return MixedPrecisionPlan(
        reached=best.ok,
        ratio=best.ratio,
        ratios=(best.ratio,),
        metric=best.metric,
        target=target,
        raised=tuple((n, "activation") for n in chosen),
        low="qint16",
        high="float16",
        cost=best.cost,
        cost_low=assignment_cost(s.ops, s.follow_chip({}), chip),
        cost_high=assignment_cost(s.ops, s.follow_chip(all_fp16), chip),
        probes=tuple(s.probes),
        setter=setter,
        chip=chip,
        notes=(
            *downgrades,
            *s.notes,
            *([] if best.ok else [f"target {target:g} not reached with up to {max_k} float16 ops"]),
        ),
    )


def j6p_base_dtypes(model: nn.Module, gemm_dtype: DtypeLike = qint8) -> dict[FakeQuantize, QuantDtype]:
    """Return the J6P starting point: every op output float16, gemm inputs and weights ``gemm_dtype``."""
    gemm = parse_dtype(gemm_dtype)
    dtypes: dict[FakeQuantize, QuantDtype] = {}
    for op in collect_ops(model).values():
        if op.output is not None:
            dtypes[op.output] = float16
        if op.info.kind is OpKind.GEMM:
            for node in op.inputs:
                dtypes[node] = gemm
            if op.weight is not None:
                dtypes[op.weight] = gemm
    return dtypes


def search_j6p(
    model: nn.Module,
    tables: SensitivityTable | Sequence[SensitivityTable],
    eval_fn: Callable[[nn.Module], float],
    target: float,
    **kwargs: Any,
) -> MixedPrecisionPlan:
    """Run the J6P path: non-gemm ops float16, gemm inputs/weights searched between qint8 and qint16.

    Every probe runs with all op outputs in float16 and gemm inputs and weights in qint8 (the seed's
    "gemm int8 + other FP16" configuration), and raises the most sensitive gemm rows (activation = the
    gemm's inputs, weight = its weight; double int16 allowed on j6p) to qint16. The setter starts from
    ``ModuleNameTemplate({"": float16})``, ``ConvDtypeTemplate(qint8, qint8)`` and
    ``MatmulDtypeTemplate(qint8)``. Use tables measured in this configuration for the best ranking.

    Args:
        model: the calibrated prepared model.
        tables: sensitivity table(s), ideally measured in the J6P base configuration.
        eval_fn: ``eval_fn(model) -> float``.
        target: the metric to reach.
        kwargs: passed to :func:`search_mixed_precision` (``cost_aware``, ``method``, ``on_probe``, ...).

    Raises:
        ValueError: as :func:`search_mixed_precision` (the model and the target are checked first).
        TypeError: as :func:`search_mixed_precision`.
        UncalibratedModelError: for a model that was never calibrated.
    """
    require_searchable(model, "search_j6p", eval_fn)
    check_number("target", target, "search_j6p")
    templates = [
        ModuleNameTemplate({"": float16}),
        ConvDtypeTemplate(input_dtype=qint8, weight_dtype=qint8),
        MatmulDtypeTemplate(input_dtypes=qint8),
    ]
    return search_mixed_precision(
        model,
        tables,
        eval_fn,
        target,
        low=qint8,
        high=qint16,
        chip=kwargs.pop("chip", "j6p"),
        base_dtypes=j6p_base_dtypes(model),
        base_templates=templates,
        op_filter=is_gemm_op,
        **kwargs,
    )
