"""Range observers beyond plain min/max: ``moving_minmax`` (moving averages) and ``fixed`` (a set scale).

Both subclass :class:`qat_lightning.quant.observers.Observer` and are re-exported from that module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from qat_lightning.quant.dtypes import QuantDtype
from qat_lightning.quant.observers.base import Observer

__all__ = ["MovingMinMaxObserver", "FixedScaleObserver"]


class MovingMinMaxObserver(Observer):
    """``moving_minmax``: exponential moving average of the per-batch min and max.

    Like torch.ao ``MovingAverageMinMaxObserver``: the first batch initialises the averages, later ones do
    ``avg += averaging_constant * (batch - avg)``; ``scale = max(|avg_min|, |avg_max|) / qmax``. The exact
    running ``min_val``/``max_val`` are kept too (for reports). ``update_range`` also updates the averages.

    Args:
        averaging_constant: weight of a new batch, in ``(0, 1]`` (1 = last batch only).
    """

    kind = "moving_minmax"

    def __init__(
        self,
        ch_axis: int | None = None,
        num_channels: int | None = None,
        ignore_nonfinite: bool = False,
        name: str = "",
        *,
        averaging_constant: float = 0.01,
    ) -> None:
        super().__init__(ch_axis, num_channels, ignore_nonfinite, name)
        c = averaging_constant
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(
                f"observer {name!r}: averaging_constant must be in (0, 1] (e.g. 0.01), got {c!r}"
            )
        self.averaging_constant = float(c)
        self.register_buffer("avg_min", torch.full(self._shape, math.inf, dtype=torch.float32))
        self.register_buffer("avg_max", torch.full(self._shape, -math.inf, dtype=torch.float32))

    def _update_extra(self, lo: torch.Tensor, hi: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        # tensor ops only (no host sync): an average still at +-inf (no data so far) takes the batch value,
        # later batches lerp; rows whose batch value is not finite keep their average
        c = self.averaging_constant
        for avg, new in ((self.avg_min, lo), (self.avg_max, hi)):
            ok = torch.isfinite(new) if finite is None else finite & torch.isfinite(new)
            moved = torch.where(torch.isinf(avg), new, avg.lerp(new, c))
            avg.copy_(torch.where(ok, moved, avg))

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        return torch.maximum(-self.avg_min, self.avg_max).double().reshape(self._rows).clamp_min(0)

    def reset_statistics(self) -> None:
        """Forget everything observed, moving averages included."""
        super().reset_statistics()
        self.avg_min.fill_(math.inf)
        self.avg_max.fill_(-math.inf)

    def _reduce_extra(self, group: Any) -> None:
        has = (torch.isfinite(self.avg_min) & torch.isfinite(self.avg_max)).float()
        packed = torch.stack(
            [self.avg_min.nan_to_num(0, 0, 0) * has, self.avg_max.nan_to_num(0, 0, 0) * has, has]
        )
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        seen = packed[2] > 0
        self.avg_min.copy_(torch.where(seen, packed[0] / packed[2].clamp_min(1), math.inf))
        self.avg_max.copy_(torch.where(seen, packed[1] / packed[2].clamp_min(1), -math.inf))

    def extra_repr(self) -> str:
        """Return the base options plus the averaging constant."""
        return ", ".join(
            p for p in (super().extra_repr(), f"averaging_constant={self.averaging_constant}") if p
        )


class FixedScaleObserver(Observer):
    """``fixed``: ``scale = threshold / qmax`` whatever the data (min/max are still tracked for reports).

    Args:
        threshold: clipping threshold: a number ``> 0``, or one ``>= 0`` per channel (``num_channels``).
    """

    kind = "fixed"
    needs_data = False

    def __init__(
        self,
        ch_axis: int | None = None,
        num_channels: int | None = None,
        ignore_nonfinite: bool = False,
        name: str = "",
        *,
        threshold: float | Sequence[float] | torch.Tensor,
    ) -> None:
        super().__init__(ch_axis, num_channels, ignore_nonfinite, name)
        try:
            thr = torch.as_tensor(threshold, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            thr = torch.tensor(math.nan)
        if thr.dim() > 1 or (thr.dim() == 1 and thr.numel() not in (1, self._rows)):
            allowed = "a number" if num_channels is None else f"a number or {self._rows} per-channel values"
            raise ValueError(
                f"observer {name!r}: threshold must be {allowed} (finite, >= 0), got shape {tuple(thr.shape)}"
            )
        if not bool(torch.isfinite(thr).all()) or bool((thr < 0).any()) or (thr.numel() == 1 and thr <= 0):
            raise ValueError(  # one threshold of 0: a 1e-8 scale, every value quantized to 0
                f"observer {name!r}: threshold must be finite and > 0 (per channel: >= 0), got {threshold!r}"
            )
        self.register_buffer("threshold", thr.float().expand(self._rows).reshape(self._shape).clone())

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        return self.threshold.double().reshape(self._rows)
