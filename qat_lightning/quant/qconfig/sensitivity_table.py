"""The sensitivity table type: produced by ``qat_lightning.analysis``, consumed by qconfig templates.

It lives in ``quant/`` so that templates (quant) can take a table without importing the analysis layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["SENSITIVE_TYPES", "SensitivityRow", "SensitivityTable"]

SENSITIVE_TYPES = ("activation", "weight")


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


@dataclass(frozen=True)
class SensitivityTable:
    """Rows sorted from most to least sensitive, for one model output and one metric.

    Attributes:
        rows: the rows, most sensitive first.
        metric_name: e.g. ``L1``, ``COSINE``, ``ATOL``.
        output_name: the model output this table is about (``0``, ``0-1``, a dict key).
        method: ``exact`` or ``approximate``.
    """

    rows: tuple[SensitivityRow, ...]
    metric_name: str = "L1"
    output_name: str = "0"
    method: str = "exact"

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
