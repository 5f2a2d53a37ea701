"""The sensitivity table type: produced by ``qat_lightning.analysis``, consumed by qconfig templates.

It lives in ``quant/`` so that templates (quant) can take a table without importing the analysis layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from qat_lightning.quant.checks import require_count, require_finite, require_str
from qat_lightning.quant.dtypes import DTYPES, QuantDtype, parse_dtype

__all__ = ["SENSITIVE_TYPES", "TABLE_METHODS", "SensitivityRow", "SensitivityTable"]

SENSITIVE_TYPES = ("activation", "weight")
TABLE_METHODS = ("exact", "approximate")
"""How a table's metric was obtained: measured by running the model, or estimated (first order)."""

_JSON_METRICS = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
"""How the report writer spells non-finite metrics (NaN is ``null``)."""


def _metric(value: Any, where: str) -> float:
    """Return a row's metric as a float; NaN and +-inf are legitimate (a node that broke the output)."""
    if value is None:
        return math.nan
    if isinstance(value, str) and value.strip().lower() in _JSON_METRICS:
        return _JSON_METRICS[value.strip().lower()]
    message = (
        f"{where}: metric must be a number (NaN/inf allowed; null, 'inf', '-inf' in JSON), got {value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, (Real, str)):
        raise TypeError(message)
    if isinstance(value, str):
        raise ValueError(message)
    return float(value)


def _quant_dtype(value: Any, where: str) -> str:
    """Return the canonical dtype name (``qint8``...), accepting what ``parse_dtype`` accepts but codes."""
    if isinstance(value, (str, QuantDtype, torch.dtype)):
        try:
            return parse_dtype(value).name
        except ValueError:
            pass
    raise ValueError(f"{where}: unknown quant_dtype {value!r}; allowed: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class SensitivityRow:
    """One row of the seed's sensitivity table.

    Attributes:
        op_name: op name (as in the check report and templates).
        sensitive_type: ``activation`` (only the op's activation quant nodes enabled) or ``weight``.
        op_type: short op type.
        metric: the error metric value with only this node enabled (higher = more sensitive, except for
            metrics where higher is better, which the producer converts so that higher = worse).
        quant_dtype: dtype of the node when measured.
        flops: the op's cost (MACs) used for cost-aware ordering.
        flops_share: ``flops`` as a share of the model's total (0..1), shown as ``flops(x.xx%)``.
    """

    op_name: str
    sensitive_type: str
    op_type: str
    metric: float
    quant_dtype: str
    flops: int = 0
    flops_share: float = 0.0

    def __post_init__(self) -> None:
        where = f"SensitivityRow {self.op_name!r} ({self.sensitive_type!r})"
        require_str("op_name", self.op_name, where)
        require_str("op_type", self.op_type, where)
        if self.sensitive_type not in SENSITIVE_TYPES:
            allowed = ", ".join(SENSITIVE_TYPES)
            raise ValueError(f"{where}: unknown sensitive_type {self.sensitive_type!r}; allowed: {allowed}")
        object.__setattr__(self, "metric", _metric(self.metric, where))
        object.__setattr__(self, "quant_dtype", _quant_dtype(self.quant_dtype, where))
        object.__setattr__(self, "flops", require_count("flops", self.flops, where, minimum=0))
        object.__setattr__(self, "flops_share", require_finite("flops_share", self.flops_share, where))


def _rows(rows: Any) -> tuple[SensitivityRow, ...]:
    """Return ``rows`` as a tuple after checking that every item is a row (naming the first that is not)."""
    if not isinstance(rows, Sequence) or isinstance(rows, str):
        raise TypeError(f"SensitivityTable: rows must be a sequence of SensitivityRow, got {rows!r:.80}")
    for index, row in enumerate(rows):
        if not isinstance(row, SensitivityRow):
            got = f"{type(row).__name__} {row!r:.60}"
            raise TypeError(f"SensitivityTable: rows[{index}] must be a SensitivityRow, got {got}")
    return tuple(rows)


@dataclass(frozen=True)
class SensitivityTable:
    """Rows sorted from most to least sensitive, for one model output and one metric.

    Attributes:
        rows: the rows, most sensitive first.
        metric_name: e.g. ``L1``, ``1-COSINE``, ``-SQNR``, or a custom metric's own name.
        output_name: the model output this table is about (``0``, ``0-1``, a dict key).
        method: one of :data:`TABLE_METHODS` (``exact`` or ``approximate``).
    """

    rows: tuple[SensitivityRow, ...]
    metric_name: str = "L1"
    output_name: str = "0"
    method: str = "exact"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", _rows(self.rows))
        require_str("metric_name", self.metric_name, "SensitivityTable", empty=False)
        require_str("output_name", self.output_name, "SensitivityTable")
        if self.method not in TABLE_METHODS:
            raise ValueError(
                f"SensitivityTable: unknown method {self.method!r}; allowed: {', '.join(TABLE_METHODS)}"
            )

    def __iter__(self) -> Iterator[SensitivityRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def top(self, topk_or_ratio: float, sensitive_type: str | None = None) -> Sequence[SensitivityRow]:
        """Return the most sensitive rows.

        ``topk_or_ratio >= 1`` is a count, ``0 <= x < 1`` a share of the rows, rounded up (any positive
        ratio keeps at least one row).

        Args:
            topk_or_ratio: count (int-like, >= 1) or ratio in [0, 1).
            sensitive_type: keep only rows of this type first (``activation`` / ``weight``), or all.

        Raises:
            ValueError: for a negative value or an unknown sensitive type.
        """
        if topk_or_ratio < 0:
            raise ValueError(f"topk_or_ratio must be >= 0, got {topk_or_ratio}")
        if sensitive_type is not None and sensitive_type not in SENSITIVE_TYPES:
            allowed = ", ".join(SENSITIVE_TYPES)
            raise ValueError(f"unknown sensitive_type {sensitive_type!r}; allowed: {allowed}")
        rows = [r for r in self.rows if sensitive_type is None or r.sensitive_type == sensitive_type]
        count = int(topk_or_ratio) if topk_or_ratio >= 1 else math.ceil(topk_or_ratio * len(rows) - 1e-9)
        return rows[:count]
