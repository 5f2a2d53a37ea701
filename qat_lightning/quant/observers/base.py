"""Calibration observers for symmetric quantization (zero point 0).

An observer watches tensors and turns what it saw into a scale for ``q = clamp(round(x / scale), qmin,
qmax)``: ``scale = amax / qmax`` for a clipping threshold ``amax`` chosen by the method. Statistics are
dtype-agnostic (running min/max for every observer, plus a growing ``|x|`` histogram for
``percentile``/``kl``/``mse``/``mix``, defined in :mod:`.histogram_observers` and
re-exported here; see :mod:`.histogram`), so
``compute_scale(qint8)`` and ``compute_scale(qint16)`` both work from one calibration pass. Everything
lives in fixed-shape buffers (``state_dict``, deepcopy, DDP broadcast).

Per tensor: ``ch_axis=None``, scale shape ``()``. Per channel: ``ch_axis`` and ``num_channels`` set at
construction, scale shape ``(num_channels,)``.

Two update paths: ``forward`` (calibration) updates everything; ``update_range`` (QAT) only the range
statistics, at about the cost of one ``torch.aminmax``, and returns the batch ``max |x|``. The histogram
of a large batch is built from a deterministic subsample plus the exact tail (block maxima), so a
histogram update costs about 2-2.7x a torch.ao ``MinMaxObserver`` update (see
``benchmarks/README.md``); pass ``max_samples=None`` to bin every element.

Edge cases: NaN/inf raise ValueError naming the observer (or are dropped with ``ignore_nonfinite=True``);
empty tensors are ignored; all-zero data gives ``SCALE_EPS``; an observer that saw nothing returns
``DEFAULT_SCALE`` and warns with its ``name``.
"""

from __future__ import annotations

import abc
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype
from qat_lightning.quant.observers.histogram import AbsHistogram
from qat_lightning.quant.observers.histogram_batch import row_extremes

__all__ = [
    "OBSERVER_NAMES",
    "SCALE_EPS",
    "DEFAULT_SCALE",
    "Observer",
    "MinMaxObserver",
]

OBSERVER_NAMES: tuple[str, ...] = ("minmax", "moving_minmax", "percentile", "kl", "mse", "mix", "fixed")

SCALE_EPS: float = 2.0**-24
"""Floor of every scale (about 6e-8, a power of two). All-zero or constant-zero data gives exactly this
scale, never 0 or NaN. It only bites when ``amax < SCALE_EPS * qmax`` (about 7.6e-6 for int8, 2e-3 for
int16): such a tensor is treated as (near) zero."""

DEFAULT_SCALE: float = 1.0
"""Scale returned (with a warning naming the observer) by an observer that never saw data."""


STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
"""Floating dtypes of quant state (scales, statistics, histograms) that model dtype casts leave alone."""


def apply_keeping_float32(module: torch.nn.Module, apply: Any, fn: Any, recurse: bool = True) -> Any:
    """``module._apply(fn)`` that moves quant state between devices but keeps its float32 (and float64) dtype.

    ``model.half()`` / ``.bfloat16()`` / ``.double()`` / ``.to(dtype)`` / ``Trainer(precision="bf16-true")``
    convert every floating buffer and parameter; scales and statistics keep their dtype instead (an fp16
    scale cannot hold 2**-24, a bf16 moving average stalls, bf16 histogram counts stop at 256). Every
    float32 / float64 buffer and parameter of ``module`` (and its submodules when ``recurse``) follows the
    device part of ``fn`` only. ``apply`` is the parent class's ``_apply``.
    """
    saved = [
        (
            m,
            {k: b for k, b in m._buffers.items() if b is not None and b.dtype in STATE_DTYPES},
            {k: p.data for k, p in m._parameters.items() if p is not None and p.dtype in STATE_DTYPES},
        )
        for m in (module.modules() if recurse else (module,))
    ]
    result = apply(fn, recurse)
    for m, buffers, params in saved:
        for name, old in buffers.items():
            new = m._buffers[name]
            if new is not None and new.dtype != old.dtype:
                m._buffers[name] = old.to(device=new.device)
        for name, old in params.items():
            param = m._parameters[name]
            if param is not None and param.dtype != old.dtype:
                param.data = old.to(device=param.device)
    return result


class Observer(torch.nn.Module, abc.ABC):
    """Base of all observers: validation, running min/max, non-finite handling, scale and reduction.

    Args:
        ch_axis: None for per-tensor statistics, else the channel axis (negative counts from the end).
        num_channels: channel count, required when ``ch_axis`` is set (ignored when it is None).
        ignore_nonfinite: drop NaN/inf values instead of raising ValueError.
        name: owner's name (op name) used in every error and warning message.

    Attributes:
        min_val: running minimum, shape ``()`` or ``(num_channels,)`` (``+inf`` before any data).
        max_val: running maximum (``-inf`` before any data).
        num_batches: number of non-empty batches seen (int64 scalar buffer).
    """

    kind: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True

    def __init__(
        self,
        ch_axis: int | None = None,
        num_channels: int | None = None,
        ignore_nonfinite: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        if ch_axis is None:
            num_channels = None  # a per-tensor observer has no channel count
        else:
            if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
                raise ValueError(f"observer {name!r}: ch_axis must be None or an int, got {ch_axis!r}")
            if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
                raise ValueError(
                    f"observer {name!r}: ch_axis={ch_axis} needs num_channels (an int >= 1), "
                    f"got {num_channels!r}"
                )
        self.ch_axis = ch_axis
        self.num_channels = num_channels
        self.ignore_nonfinite = bool(ignore_nonfinite)
        self._rows = 1 if num_channels is None else num_channels
        shape = () if num_channels is None else (num_channels,)
        self.register_buffer("min_val", torch.full(shape, math.inf, dtype=torch.float32))
        self.register_buffer("max_val", torch.full(shape, -math.inf, dtype=torch.float32))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        # batches with NaN/inf seen by the sync-free path (raised at compute_scale); not checkpointed
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64), persistent=False)
        self.histogram: AbsHistogram | None = None
        self._resets = 0  # counted by reset_statistics: batches_seen() then differs even at equal counts

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        return apply_keeping_float32(self, super()._apply, fn, recurse)

    # ---- observing ---------------------------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return f"{self.name!r} ({type(self).__name__})" if self.name else f"<unnamed {type(self).__name__}>"

    @property
    def _shape(self) -> tuple[int, ...]:
        return () if self.num_channels is None else (self.num_channels,)

    def _rows_view(self, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis is None:
            return x.reshape(1, -1)
        if x.dim() == 0 or not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(
                f"observer {self._label}: ch_axis={self.ch_axis} is out of range for a tensor of shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[self.ch_axis] != self.num_channels:
            raise ValueError(
                f"observer {self._label} was built for {self.num_channels} channels (ch_axis={self.ch_axis}) "
                f"but got a tensor with {x.shape[self.ch_axis]} channels, shape {tuple(x.shape)}"
            )
        return x.movedim(self.ch_axis, 0).reshape(self.num_channels, -1)

    def _observe(self, x: torch.Tensor) -> None:
        """Update range statistics and histogram (the histogram observers' forward) without a host sync."""
        x = x.detach()
        hist = self.histogram
        if x.numel() == 0 or hist is None:
            return
        x2 = self._rows_view(x if x.is_floating_point() else x.float())
        if self._rows == 1:
            x2 = x2.contiguous()  # blocks and sampled chunks are views of contiguous memory
        lo, hi, tail, valid = hist.extremes(x2, self.ignore_nonfinite)
        amax, finite = self._record_range(lo.float(), hi.float())
        hist.observe(x2, amax.reshape(-1), self.num_batches, finite.reshape(-1), valid, tail)
        self.num_batches.add_(finite.any() if finite.dim() else finite)

    def _record_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold a batch's per-row min/max into the statistics; rows holding NaN/inf are skipped and counted.

        Returns:
            ``(amax, finite)`` as :meth:`update_range` documents them (``num_batches`` is not touched).
        """
        if lo.shape != self._shape:
            lo, hi = lo.reshape(self._shape), hi.reshape(self._shape)
        amax = torch.maximum(-lo, hi)  # >= 0 where finite; NaN, inf or -inf (no valid entry) otherwise
        finite = amax.abs() < math.inf
        skip = ~finite  # the rows holding NaN/inf (or no valid entry): not used
        if not self.ignore_nonfinite:
            self.nonfinite_batches.add_(skip.any() if skip.dim() else skip)
        torch.minimum(self.min_val, lo.masked_fill(skip, math.inf), out=self.min_val)
        torch.maximum(self.max_val, hi.masked_fill(skip, -math.inf), out=self.max_val)
        self._update_extra(lo, hi, finite)
        return amax.masked_fill(skip, 0.0), finite

    def _update_extra(self, lo: torch.Tensor, hi: torch.Tensor, finite: torch.Tensor | None = None) -> None:
        """Update range statistics beyond running min/max (moving averages) where ``finite``; no-op here."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        """Update all statistics with a batch (empty tensors are ignored; any device; no host sync).

        NaN/inf are handled as :meth:`update_range` documents (counted, raised by ``compute_scale``).

        Raises:
            ValueError: on a channel-count mismatch.
        """
        if self.histogram is None:
            self.update_range(x)
        else:
            self._observe(x)

    @torch.no_grad()
    def update_range(
        self, x: torch.Tensor, row_factor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the range statistics (no histogram) without any host sync; the QAT and range-only path.

        A batch holding NaN/inf leaves the statistics of the rows it touches unchanged (with
        ``ignore_nonfinite`` only the non-finite values are dropped) and counts in ``nonfinite_batches``:
        the error is raised when the scale is next computed (``compute_scale``), not inside the forward.

        Args:
            x: the batch.
            row_factor: optional nonzero factor per row (per channel): the statistics are those of
                ``x * row_factor`` (broadcast along the channel axis), exactly, without forming that
                product (float rounding is monotone, so the extremes of the products are the products of
                the extremes).

        Returns:
            ``(amax, finite)``: the batch ``max |x|`` (float32, ``>= 0``; shape ``()`` per tensor,
            ``(num_channels,)`` per channel) and whether each row was finite (bool, same shape).
        """
        if x.numel() == 0:
            return torch.zeros(self._shape, device=x.device), torch.zeros(
                self._shape, dtype=torch.bool, device=x.device
            )
        x = x if x.dtype == torch.float32 else x.float()  # no detach needed: no_grad
        if self.ch_axis is None and not self.ignore_nonfinite:
            lo, hi = torch.aminmax(x)  # one row: x as it is (no reshape, no copy of a strided x)
        else:
            x2 = self._rows_view(x)
            valid = x2.abs() < math.inf if self.ignore_nonfinite else None  # isfinite in 2 passes, not 4
            lo, hi = row_extremes(x2, valid)
        if row_factor is not None:
            f = row_factor.detach().reshape(lo.shape)
            lo, hi = torch.minimum(lo * f, hi * f), torch.maximum(lo * f, hi * f)
        return self.record_extremes(lo, hi)

    @torch.no_grad()
    def record_extremes(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record a batch whose per-row minima and maxima were computed elsewhere (a fused kernel).

        The statistics move exactly as :meth:`update_range` moves them for a batch with these extremes.

        Args:
            lo: per-row minimum, shape ``()`` or ``(num_channels,)``; NaN marks a row holding NaN/inf.
            hi: per-row maximum, same shape.

        Returns:
            ``(amax, finite)`` as :meth:`update_range` returns them.
        """
        amax, finite = self._record_range(lo, hi)
        self.num_batches.add_(finite.any() if finite.dim() else finite)
        return amax, finite

    # ---- results -----------------------------------------------------------------------------------------

    def batches_seen(self) -> tuple[int, int, int]:
        """Return ``(num_batches, nonfinite_batches, resets)``, read on the host (not for a forward).

        ``resets`` counts :meth:`reset_statistics` calls, so a reset followed by as many batches as before
        still reads as new data. On a GPU this syncs.
        """
        return int(self.num_batches), int(self.nonfinite_batches), self._resets

    @property
    def has_data(self) -> bool:
        """True once a non-empty batch has been observed (survives ``state_dict`` round-trips)."""
        return bool(self.num_batches > 0)

    def observed_amax(self) -> torch.Tensor:
        """``max(|min_val|, |max_val|)`` per row as float64, shape ``(rows,)`` (0 before any data)."""
        amax = torch.maximum(-self.min_val, self.max_val).double().reshape(self._rows)
        return amax.clamp_min(0)

    @abc.abstractmethod
    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        """Clipping threshold per row, shape ``(rows,)``."""

    @torch.no_grad()
    def compute_scale(self, dtype: DtypeLike) -> torch.Tensor:
        """Scale for an integer dtype from the kept statistics (no new data needed).

        Args:
            dtype: ``qint8``/``qint16`` (a :class:`QuantDtype`, or anything ``parse_dtype`` accepts).

        Returns:
            float32 tensor of shape ``()`` (per tensor) or ``(num_channels,)``, every entry ``>= SCALE_EPS``.
            An observer that saw no data returns :data:`DEFAULT_SCALE` and warns.

        Raises:
            ValueError: for a non-integer dtype.
        """
        qdtype = parse_dtype(dtype)
        if not qdtype.is_integer:
            raise ValueError(
                f"observer {self._label}: compute_scale needs an integer dtype (qint8, qint16), got {qdtype}"
            )
        self.check_finite()
        if self.needs_data and not self.has_data:
            warnings.warn(
                f"observer {self._label} has seen no data; using DEFAULT_SCALE={DEFAULT_SCALE}",
                RuntimeWarning,
                stacklevel=2,
            )
            return torch.full(self._shape, DEFAULT_SCALE, device=self.min_val.device)
        thr = self._threshold(qdtype).double().nan_to_num(nan=0.0, posinf=0.0).clamp_min(0)
        return (thr / qdtype.qmax).clamp_min(SCALE_EPS).float().reshape(self._shape)

    def check_finite(self) -> None:
        """Raise if a batch seen by :meth:`update_range` held NaN/inf (and ``ignore_nonfinite`` is off).

        Raises:
            ValueError: naming the observer and the number of such batches.
        """
        if self.nonfinite_batches.is_meta:
            return  # a shape-only copy has no values to check
        bad = int(self.nonfinite_batches)
        if bad and not self.ignore_nonfinite:
            raise ValueError(
                f"observer {self._label} got non-finite value(s) (NaN/inf) in {bad} batch(es); fix the input "
                "or build the observer with ignore_nonfinite=True to drop them"
            )

    def reset_statistics(self) -> None:
        """Forget everything observed (buffers keep their shapes)."""
        self._resets += 1
        self.nonfinite_batches.zero_()
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)
        self.num_batches.zero_()
        if self.histogram is not None:
            self.histogram.counts.zero_()
            self.histogram.hist_range.zero_()

    def reduce_statistics(self, group: Any = None) -> None:
        """All-reduce the statistics over ``group`` so every rank holds the global ones.

        min via MIN, max via MAX, batch counts via SUM, moving averages averaged over the ranks that saw
        data, histograms brought to the largest range (exact re-binning) and summed. No-op unless
        ``torch.distributed`` is available and initialized.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        self._reduce_extra(group)
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(self.num_batches, op=dist.ReduceOp.SUM, group=group)
        if self.histogram is not None:
            self.histogram.reduce(group)

    def _reduce_extra(self, group: Any) -> None:
        """Reduce statistics beyond the base ones (called before the base reductions); no-op here."""

    def extra_repr(self) -> str:
        """Return name, channel axis and options for ``repr``."""
        parts = [f"name={self.name!r}"] if self.name else []
        if self.ch_axis is not None:
            parts.append(f"ch_axis={self.ch_axis}, num_channels={self.num_channels}")
        if self.ignore_nonfinite:
            parts.append("ignore_nonfinite=True")
        return ", ".join(parts)


class MinMaxObserver(Observer):
    """``minmax``: running min/max over all batches; ``scale = max(|min|, |max|) / qmax``.

    torch.ao's symmetric observers use ``amax / ((qmax - qmin) / 2)`` (``amax / 127.5`` for int8); this one
    never clips (``amax / 127``).
    """

    kind = "minmax"

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        return self.observed_amax()
