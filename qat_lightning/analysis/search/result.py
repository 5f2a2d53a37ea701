"""What a mixed-precision search returns: :class:`Probe` (one evaluation) and :class:`MixedPrecisionPlan`."""

from __future__ import annotations

from dataclasses import dataclass, field

from qat_lightning.quant.qconfig.setter import QconfigSetter

__all__ = ["Probe", "MixedPrecisionPlan"]


@dataclass(frozen=True)
class Probe:
    """One evaluation of the search.

    Attributes:
        stage: ``baseline``, ``all_high``, ``common``, ``per_table``, ``cost`` or ``fp16``.
        ratio: share of all table rows raised (the common ratio in stage ``common``).
        counts: rows raised per table (stage ``cost``: rows of each table's top count still raised).
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
        ratios: each table's final share: the rows of its top count still raised (after the cost step:
            fewer), over the rows the search counts in it. Without the cost step a ``SensitivityTemplate``
            per table fed its ratio reproduces ``raised``; after the cost step the rows are in general no
            top-k, so such a template would not (``setter`` does; ``mixed_precision`` module docstring).
        metric: the metric of the plan.
        target: the target metric.
        raised: ``(op_name, sensitive_type)`` rows set to ``high`` (in table order).
        low: the starting dtype; high: the raised dtype.
        cost: estimated cost of the plan; cost_low / cost_high: all-low / all-raised costs.
        probes: every evaluation, in order.
        setter: a ready ``QconfigSetter`` reproducing the plan with ``prepare``.
        chip: the chip the rules and prices came from (``None``: none; prices of ``j6m``).
        notes: the chip downgrades of the plan's own assignment (what a ``prepare`` with ``setter`` logs,
            beyond the model's own), then the search's remarks.
        method: how the boundary was searched (``exact``: bisection; ``fast``: first-order guess).
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
    method: str = "exact"
