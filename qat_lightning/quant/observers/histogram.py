"""Histogram statistics of ``|x|`` (the threshold searches on them are re-exported from their modules).

Layout of :class:`AbsHistogram` (one row per channel, a single row per tensor):

* ``counts`` has shape ``(rows, bins + 1)`` (float64, estimated element counts). Column 0 counts the
  elements that are exactly zero; column ``j >= 1`` counts ``|x|`` in ``((j - 1) * w, j * w]`` with bin
  width ``w = hist_range / bins``.
* ``hist_range`` (shape ``(rows,)``) is always zero (nothing non-zero seen yet) or a power of two
  (at least :data:`RANGE_MIN`). When a batch exceeds it, the range is multiplied by ``2**k`` and groups
  of ``2**k`` adjacent bins are summed: exact re-binning, no interpolation. Because every range is a power
  of two, histograms from different batches or ranks can always be brought to a common range exactly.
* ``bins`` is a power of two, so ``|x| * bins / hist_range`` is an exact float product and
  ``ceil`` of it is the bin index (bin 0 only for exact zeros).
* the observers choose ``bins`` with :func:`default_bins`: 2048 per tensor; per channel, for the kl / mse /
  mix searches, the count they search after :func:`coarsen` (256 for 256 channels), which gives the same
  scales as 2048 bins (nested power-of-two edges) with less memory and a cheaper update.

Sampling (the cost of the per-batch update): a batch row longer than the per-row cap (``max_samples``,
default ``2**15``, per tensor; ``max(max_samples // rows, 4096)`` per channel) is binned from a
deterministic strided subsample, each sampled element counting ``len / n_sampled``:

* per tensor: the flattened batch is cut into chunks of :data:`SAMPLE_CHUNK` (16) consecutive elements
  (one cache line of float32) and every ``p``-th chunk is taken, starting at chunk ``batch_index % p``;
  ``p`` is the smallest prime ``>= ceil(len / cap)`` (prime, so the stride does not alias with tensor
  dimensions; the rotating start covers other elements on later batches);
* per channel: every ``p``-th element of each row, same rule for ``p`` and the start.

Exact tail (per tensor, when sampling): a subsample misses the few largest values, which matter for
high percentiles and for int16 (where clipping even a handful of outliers dominates the error). So the
observer takes the min/max of every block of :data:`TAIL_BLOCK` (256) elements instead of one global
``torch.aminmax`` (``amin`` + ``amax`` along a block axis; the global min/max follow exactly), and the
block maxima of ``|x|`` form an exact sample of the top of the distribution: the bins above the cut
where only :data:`TAIL_SHARE` (1/32) of the blocks have their maximum are counted from the block
maxima (weight 1), the bins up to the cut from the subsample. Above the cut a block rarely holds two
values, so the tail count is low by at most about 1.6 % near the cut and exact further out. Every
search also caps its threshold at the exact ``amax``, and ``minmax`` never depends on sampling.

Per-batch update without host syncs (:meth:`AbsHistogram.observe`): the new range is
``max(range, pow2_ceil(amax))`` and the counts are re-binned to it on every batch (a plain copy when
it did not grow; exact summing of ``2**k`` bins when it did); the sampling start is a device tensor
(positions are gathered, the last one masked when it falls outside the batch); counts use a
fixed-size bincount (:func:`~.histogram_batch.count_bins`). Rows holding NaN/inf are skipped
(counted by the observer); with ``ignore_nonfinite`` the subsample of the batch is taken as if it
were finite and the non-finite entries are left out, each row weighted by its finite count (the
previous code subsampled the compacted batch: counts differ only for batches that held NaN/inf).

The threshold searches built on these statistics live in :mod:`.histogram_search`
(percentile, mse, mix), :mod:`.kl_search` (kl) and
:mod:`.histogram_error` (the error model); their public names are re-exported here.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from qat_lightning.quant.observers.histogram_batch import (
    RANGE_MIN,
    block_extremes,
    count_bins,
    pow2_ceil,
    row_extremes,
)
from qat_lightning.quant.observers.histogram_error import coarsen, estimate_mse, search_bins
from qat_lightning.quant.observers.histogram_search import (
    MIX_CANDIDATES,
    kl_threshold,
    mix_candidates,
    mix_threshold,
    mse_threshold,
    percentile_threshold,
)

__all__ = [
    "RANGE_MIN",
    "DEFAULT_BINS",
    "DEFAULT_MAX_SAMPLES",
    "AbsHistogram",
    "default_bins",
    "pow2_ceil",
    "coarsen",
    "estimate_mse",
    "percentile_threshold",
    "mse_threshold",
    "kl_threshold",
    "MIX_CANDIDATES",
    "mix_candidates",
    "mix_threshold",
]

DEFAULT_BINS: int = 2048
"""Bins per row of a per-tensor (and of every ``percentile``) histogram; see :func:`default_bins`."""
DEFAULT_MAX_SAMPLES: int = 2**15
MIN_BINS, MAX_BINS = 256, 2**16
MIN_SAMPLES_PER_ROW: int = 4096
SAMPLE_CHUNK: int = 16
TAIL_SHARE: float = 1 / 32


def validate_bins(bins: int) -> int:
    """Check ``bins`` is a power of two in ``[256, 65536]`` and return it; ValueError otherwise."""
    if (
        isinstance(bins, bool)
        or not isinstance(bins, int)
        or not MIN_BINS <= bins <= MAX_BINS
        or bins & (bins - 1)
    ):
        raise ValueError(f"bins must be a power of two in [{MIN_BINS}, {MAX_BINS}] (e.g. 2048), got {bins!r}")
    return bins


def validate_max_samples(max_samples: int | None) -> int | None:
    """Check ``max_samples`` is None (bin every element) or an int >= 4096; ValueError otherwise."""
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < MIN_SAMPLES_PER_ROW:
        raise ValueError(
            f"max_samples must be None (bin every element) or an int >= {MIN_SAMPLES_PER_ROW}, "
            f"got {max_samples!r}"
        )
    return max_samples


@functools.lru_cache(maxsize=1024)
def _prime_at_least(n: int) -> int:
    """Return the smallest prime ``>= n`` (plain int arithmetic: a traced symbolic size is guarded)."""
    n = max(n, 2)
    d = 2
    while d * d <= n:
        if n % d == 0:
            n, d = n + 1, 2
        else:
            d += 1
    return n


def default_bins(rows: int, coarsened: bool) -> int:
    """Default bin count per row of a histogram with ``rows`` rows.

    Args:
        rows: 1 per tensor, the channel count per channel.
        coarsened: True for the kl / mse / mix searches, which merge many-channel histograms to
            :func:`~.histogram_error.search_bins` bins per row before searching: their
            histograms are built with that many bins (``min(2048, max(256, 2**16 // rows))`` rounded down
            to a power of two: 2048 up to 32 rows, 256 from 256 rows). The bin edges are nested powers of
            two, so binning directly at that count gives the same merged histogram (and the same scales)
            at a fraction of the memory and update cost. False (``percentile``, no merging): 2048.
    """
    return min(DEFAULT_BINS, search_bins(rows)) if coarsened else DEFAULT_BINS


class AbsHistogram(torch.nn.Module):
    """Growing histogram of ``|x|`` per row (see the module docstring for the exact layout).

    Args:
        rows: 1 for a per-tensor histogram, the channel count for a per-channel one.
        bins: number of non-zero bins, a power of two in ``[256, 65536]``.
        max_samples: per-batch sampling cap (per tensor; per channel it is
            ``max(max_samples // rows, 4096)``); None bins every element.
    """

    def __init__(self, rows: int, bins: int = DEFAULT_BINS, max_samples: int | None = DEFAULT_MAX_SAMPLES):
        super().__init__()
        self.rows = rows
        self.bins = validate_bins(bins)
        self.max_samples = validate_max_samples(max_samples)
        self.register_buffer("counts", torch.zeros(rows, bins + 1, dtype=torch.float64))
        self.register_buffer("hist_range", torch.zeros(rows, dtype=torch.float64))
        self.register_buffer("bin_index", torch.arange(bins + 1, dtype=torch.float64), persistent=False)
        self.register_buffer("row_start", torch.arange(rows)[:, None] * (bins + 1), persistent=False)

    @property
    def width(self) -> torch.Tensor:
        """Bin width per row, shape ``(rows,)`` (0 for rows that saw only zeros)."""
        return self.hist_range / self.bins

    def total(self) -> torch.Tensor:
        """Estimated number of observed elements per row, shape ``(rows,)``."""
        return self.counts.sum(-1)

    def rebin(self, new_range: torch.Tensor) -> None:
        """Merge bins so each row covers ``new_range`` (powers of two ``>=`` the current ranges).

        Tensor ops only (no host sync): a row whose range does not change is copied exactly, a row whose
        range grows by ``2**k`` has groups of ``2**k`` adjacent bins summed (exact re-binning).
        """
        new_range = new_range.to(self.hist_range)
        self._merge(torch.zeros_like(self.counts), new_range, new_range.clamp_min(RANGE_MIN))

    def _merge(self, batch: torch.Tensor, target: torch.Tensor, target_min: torch.Tensor) -> None:
        """Set ``counts = batch + counts re-binned to target`` (``target_min``: ``target`` >= RANGE_MIN)."""
        # old / new = 2**-k exactly (0 for a row that saw only zeros: all its counts are in bin 0)
        ratio = self.hist_range / target_min
        new_j = (self.bin_index * ratio[:, None]).ceil_().long()
        self.counts.copy_(batch.scatter_add_(1, new_j, self.counts))
        self.hist_range.copy_(target)

    def sample_cap(self, length: int) -> int:
        """Most elements per row binned from a batch row of ``length`` elements (``length`` = no sampling)."""
        if self.max_samples is None:
            return length
        return self.max_samples if self.rows == 1 else max(self.max_samples // self.rows, MIN_SAMPLES_PER_ROW)

    def extremes(
        self, x2: torch.Tensor, ignore_nonfinite: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-row min and max of a batch for :meth:`observe` (one pass; no host sync).

        Args:
            x2: the batch, shape ``(rows, n)``, contiguous when ``rows == 1``.
            ignore_nonfinite: leave NaN/inf out (else they show up in the min/max).

        Returns:
            ``(min, max, tail, valid)``: ``tail`` holds the block maxima of ``|x|`` (per tensor, when the
            batch will be subsampled; else None), ``valid`` the finite mask (only with ``ignore_nonfinite``).
        """
        rows, length = x2.shape
        valid = x2.abs() < math.inf if ignore_nonfinite else None  # isfinite in 2 passes, not 4
        if rows == 1 and length > self.sample_cap(length):
            flat_valid = None if valid is None else valid.view(-1)
            return (*block_extremes(x2.view(-1), flat_valid), valid)
        return (*row_extremes(x2, valid), None, valid)

    def _sample(
        self, x2: torch.Tensor, batch_index: torch.Tensor | int, cap: int, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Gather the deterministic subsample of a batch (module docstring) at computed positions.

        Returns:
            ``(sample, picked, valid_sample, elements_per_position)``: ``picked`` marks the positions that
            lie inside the batch (the last one may not: the count taken depends on the rotating start).
        """
        rows, length = x2.shape
        chunk = SAMPLE_CHUNK if rows == 1 else 1  # per tensor: whole chunks of one cache line each
        n_pos = length // chunk
        prime = _prime_at_least.__wrapped__ if torch.compiler.is_compiling() else _prime_at_least
        step = prime(-(-n_pos * chunk // cap))  # a constant in a compiled graph (a dynamic size: guarded)
        pos = torch.arange(0, n_pos, step, device=x2.device).add_(batch_index % step)
        picked = pos < n_pos
        pos.clamp_max_(n_pos - 1)
        if rows == 1:
            sample = x2.view(-1)[: n_pos * chunk].view(n_pos, chunk).index_select(0, pos)
            if valid is not None:
                valid = valid.view(-1)[: n_pos * chunk].view(n_pos, chunk).index_select(0, pos)
            return sample, picked[:, None], valid, chunk
        valid = None if valid is None else valid.index_select(1, pos)
        return x2.index_select(1, pos), picked[None, :], valid, chunk

    def observe(
        self,
        x2: torch.Tensor,
        amax: torch.Tensor,
        batch_index: torch.Tensor | int,
        finite: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        tail: torch.Tensor | None = None,
    ) -> None:
        """Add one batch with tensor ops only (no host sync, static shapes: compiles with ``fullgraph``).

        Args:
            x2: the batch, shape ``(rows, n)``, contiguous when ``rows == 1``.
            amax: exact ``max |x|`` of the counted entries per row, shape ``(rows,)``.
            batch_index: index of this batch (an int64 scalar tensor in the forward); rotates the
                sampling offset.
            finite: bool ``(rows,)``: the rows to count (a row holding NaN/inf is skipped whole); None: all.
            valid: optional boolean mask shaped like ``x2``; False entries are not counted.
            tail: per-tensor only, the block maxima of ``|x|`` from :meth:`extremes`; when given and
                the batch is subsampled, the top bins come from them (see the module docstring).
        """
        rows, length = x2.shape
        bins = self.bins
        if finite is None:
            finite = torch.ones(rows, dtype=torch.bool, device=x2.device)
        target = torch.maximum(pow2_ceil(amax), self.hist_range)
        target_min = target.clamp_min(RANGE_MIN)
        cap = self.sample_cap(length)
        keep = finite[:, None]  # (rows, 1): rows to count
        weight = None  # per row; None: every element of the batch was binned once
        kept_full = None if valid is None else valid.sum(1, dtype=torch.float64)
        if length <= cap:
            sample, tail = x2, None
        else:
            sample, picked, valid, chunk = self._sample(x2, batch_index, cap, valid)
            keep = keep & picked
            weight = length / (picked.sum(dtype=torch.float64) * chunk)
        if valid is not None:
            keep = keep & valid
            kept = keep.reshape(rows, -1).sum(1, dtype=torch.float64)
            weight = torch.where(kept > 0, kept_full / kept.clamp_min(1), 0.0)
        a = sample.abs() if sample.dtype in (torch.float32, torch.float64) else sample.float().abs()
        inv_w = target_min.reciprocal().mul_(bins).to(a.dtype)[:, None]  # an exact power of two
        idx = a.mul_(inv_w).ceil_().long()
        if rows > 1:
            idx += self.row_start
        n_bins = rows * (bins + 1)
        counts = count_bins(idx.masked_fill_(~keep, n_bins), n_bins).view(rows, bins + 1)
        if tail is not None:
            batch = self._with_tail(counts, weight, tail, inv_w[0], finite)
        elif weight is None:
            batch = counts.double()
        else:
            batch = counts * weight.reshape(-1, 1)
        self._merge(batch, target, target_min)

    def _with_tail(
        self,
        counts: torch.Tensor,
        weight: torch.Tensor,
        tail: torch.Tensor,
        inv_w: torch.Tensor,
        finite: torch.Tensor,
    ) -> torch.Tensor:
        """Per tensor: the bulk from the weighted subsample up to the cut, the exact block maxima above it."""
        bins = self.bins
        tail = tail if tail.dtype in (torch.float32, torch.float64) else tail.float()
        ok = torch.isfinite(tail) & finite
        top = count_bins(torch.where(ok, (tail * inv_w).ceil_().long(), bins + 1), bins + 1)
        # cut = first bin with at most TAIL_SHARE of the (counted) block maxima above it
        top_cum = top.cumsum(0)
        cut = (top_cum < top_cum[-1] * (1 - TAIL_SHARE)).sum()
        return torch.where(self.bin_index <= cut, counts * weight.reshape(1, 1), top)

    def reduce(self, group: object | None = None) -> None:
        """All-reduce across ranks: MAX of the ranges, exact local re-bin to them, then SUM of the counts."""
        common = self.hist_range.clone()
        dist.all_reduce(common, op=dist.ReduceOp.MAX, group=group)
        self.rebin(common)
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
