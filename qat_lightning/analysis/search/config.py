"""Options of the mixed-precision search: :class:`SearchConfig` (validated at construction)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qat_lightning.analysis.checks import check_bool
from qat_lightning.analysis.search.precision_nodes import OpNodes
from qat_lightning.analysis.search.probe_cache import CACHE_REFERENCES
from qat_lightning.chips import get_chip
from qat_lightning.quant.dtypes import DtypeLike, parse_dtype, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.qconfig.qconfig import QConfig
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES
from qat_lightning.quant.qconfig.templates import Template, precision_rank

__all__ = ["SEARCH_METHODS", "SearchConfig"]

SEARCH_METHODS: tuple[str, ...] = ("exact", "fast")
"""``exact``: bisection; ``fast``: first-order guess, verified (see ``mixed_precision``)."""


@dataclass(frozen=True)
class SearchConfig:
    """Options of :func:`search_mixed_precision` (validated at construction).

    Attributes:
        low: the starting precision (informational; the model's own dtypes are the start).
        high: the precision raised rows get.
        chip: ``j6e``/``j6m``/``j6p`` for chip rules (no double int16 gemm on j6e/j6m) and prices.
        cost_aware: after the ratio search, try the raised ops back in ``low``, most FLOPs first.
        higher_is_better: ``False`` when the metric is an error (target is an upper bound).
        sensitive_type: use only ``activation`` or ``weight`` rows (``None``: both).
        method: ``fast`` (first-order guess, verification around it, one check below, bisection's
            path where the metric is not monotone or the guess was off: module docstring) or
            ``exact`` (bisection).
        base_dtypes: node dtypes applied under every probe (e.g. fp16 outputs, see ``search_j6p``).
        base_templates: templates reproducing ``base_dtypes`` in the plan's setter.
        reference_qconfig: the setter's reference qconfig (default ``get_qconfig(weight_dtype=low,
            out_dtype=low)``, with its ``mse`` observer: not the configuration the model was prepared
            with, which the model does not keep; pass that one, and its templates as ``base_templates``,
            for ``plan.setter`` to rebuild the probed model).
        max_cost_probes: at most this many probes in the cost-aware step (default: all raised ops).
        op_filter: keep only table rows whose op passes (``search_j6p``: gemm ops only).
        reuse_activations: serve each probe's forwards of an fx ``GraphModule`` from kept activations,
            executing only the nodes downstream of the ops whose quant nodes changed (same values as the
            full forwards; :mod:`~qat_lightning.analysis.search.probe_cache`). Off by default: it pays
            only when the changed ops sit late in the graph; keeping every activation alive makes a
            probe that reruns most of the graph slower than the plain forward (benchmarks/README.md).
        cache_budget_mb: most megabytes of kept activations (the oldest kept runs are dropped beyond).
        cache_reference: which kept run a probe starts from: ``nearest`` (the one with the fewest nodes
            to execute, e.g. the previous probe) or ``base`` (the first probe's run only).
    """

    low: DtypeLike = qint8
    high: DtypeLike = qint16
    chip: str | None = None
    cost_aware: bool = False
    higher_is_better: bool = True
    sensitive_type: str | None = None
    method: str = "fast"
    base_dtypes: Mapping[FakeQuantize, DtypeLike] | None = None
    base_templates: Sequence[Template] = ()
    reference_qconfig: QConfig | None = None
    max_cost_probes: int | None = None
    op_filter: Callable[[OpNodes], bool] | None = None
    reuse_activations: bool = False
    cache_budget_mb: float = 1024.0
    cache_reference: str = "nearest"

    def __post_init__(self) -> None:
        low, high = parse_dtype(self.low), parse_dtype(self.high)
        if precision_rank(high) <= precision_rank(low):
            raise ValueError(f"high ({high}) must be a higher precision than low ({low})")
        if self.sensitive_type is not None and self.sensitive_type not in SENSITIVE_TYPES:
            raise ValueError(
                f"unknown sensitive_type {self.sensitive_type!r}; allowed: None, {', '.join(SENSITIVE_TYPES)}"
            )
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(SEARCH_METHODS)}")
        probes = self.max_cost_probes
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 0):
            raise ValueError(f"max_cost_probes must be None or an int >= 0, got {probes!r}")
        for flag in ("cost_aware", "higher_is_better"):
            check_bool(flag, getattr(self, flag), "SearchConfig")
        if not isinstance(self.reuse_activations, bool):
            raise ValueError(f"reuse_activations must be True or False, got {self.reuse_activations!r}")
        budget = self.cache_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
            raise ValueError(f"cache_budget_mb must be a number > 0 (megabytes), got {budget!r}")
        if self.cache_reference not in CACHE_REFERENCES:
            raise ValueError(
                f"unknown cache_reference {self.cache_reference!r}; allowed: {', '.join(CACHE_REFERENCES)}"
            )
        self._check_objects()

    def _check_objects(self) -> None:
        """Check the chip name, the filter and the base dtypes (no value is accepted only to fail later)."""
        if self.chip is not None:
            get_chip(self.chip)  # ValueError listing the known chips
        if self.op_filter is not None and not callable(self.op_filter):
            raise TypeError(f"op_filter must be a callable OpNodes -> bool or None, got {self.op_filter!r}")
        for node, dtype in (self.base_dtypes or {}).items():
            if not isinstance(node, FakeQuantize):
                raise TypeError(f"base_dtypes keys must be FakeQuantize nodes of the model, got {node!r}")
            parse_dtype(dtype)


def _config(config: SearchConfig | None, options: Mapping[str, Any]) -> SearchConfig:
    if config is not None and not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    allowed = [f.name for f in dataclasses.fields(SearchConfig)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = " (files: pass on_probe=SearchReporter(out_dir).probe and call its write(plan))"
        raise TypeError(
            f"unknown search option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
            + (hint if "out_dir" in unknown else "")
        )
    return dataclasses.replace(config or SearchConfig(), **options)
