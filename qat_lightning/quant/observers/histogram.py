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

The threshold searches built on these statistics live in :mod:`.histogram_search`
(percentile, mse, mix), :mod:`.kl_search` (kl) and
:mod:`.histogram_error` (the error model); their public names are re-exported here.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

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

RANGE_MIN: float = 2.0**-64
"""Smallest non-zero histogram range (keeps ``bins / range`` finite in float32)."""
DEFAULT_BINS: int = 2048
"""Bins per row of a per-tensor (and of every ``percentile``) histogram; see :func:`default_bins`."""
DEFAULT_MAX_SAMPLES: int = 2**15
MIN_BINS, MAX_BINS = 256, 2**16
MIN_SAMPLES_PER_ROW: int = 4096
TAIL_BLOCK: int = 256
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
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
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


def pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= t`` (at least :data:`RANGE_MIN`) where ``t > 0``, else 0 (float64)."""
    t = t.double()
    mant, exp = torch.frexp(t)  # t = mant * 2**exp, mant in [0.5, 1)
    p = torch.where(mant == 0.5, t, torch.ldexp(torch.ones_like(t), exp))
    return torch.where(t > 0, p.clamp_min(RANGE_MIN), torch.zeros_like(t))


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
        self.register_buffer("bin_index", torch.arange(bins + 1), persistent=False)

    @property
    def width(self) -> torch.Tensor:
        """Bin width per row, shape ``(rows,)`` (0 for rows that saw only zeros)."""
        return self.hist_range / self.bins

    def total(self) -> torch.Tensor:
        """Estimated number of observed elements per row, shape ``(rows,)``."""
        return self.counts.sum(-1)

    def rebin(self, new_range: torch.Tensor) -> None:
        """Merge bins so each row covers ``new_range`` (powers of two ``>=`` the current ranges)."""
        new_range = new_range.to(self.hist_range)
        if torch.equal(new_range, self.hist_range):
            return
        old = self.hist_range
        factor = torch.where(old > 0, new_range / torch.where(old > 0, old, 1.0), 1.0)
        j = torch.arange(self.bins + 1, dtype=torch.float64, device=old.device)
        new_j = torch.ceil(j[None, :] / factor[:, None]).long()
        offsets = torch.arange(self.rows, device=old.device)[:, None] * (self.bins + 1)
        merged = torch.zeros_like(self.counts).view(-1)
        merged.index_add_(0, (new_j + offsets).view(-1), self.counts.view(-1))
        self.counts.copy_(merged.view_as(self.counts))
        self.hist_range.copy_(new_range)

    def sample_cap(self, length: int) -> int:
        """Most elements per row binned from a batch row of ``length`` elements (``length`` = no sampling)."""
        if self.max_samples is None:
            return length
        return self.max_samples if self.rows == 1 else max(self.max_samples // self.rows, MIN_SAMPLES_PER_ROW)

    @staticmethod
    def block_extremes(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Min, max and the ``|x|`` maximum of every block of :data:`TAIL_BLOCK` elements (one pass each).

        Args:
            flat: 1-D tensor.

        Returns:
            ``(min, max, block_abs_max)``; a trailing partial block contributes its elements one by one.
        """
        n_blocks = flat.numel() // TAIL_BLOCK
        body = flat[: n_blocks * TAIL_BLOCK].reshape(n_blocks, TAIL_BLOCK)
        bmin, bmax = body.amin(1), body.amax(1)
        lo, hi, tail = bmin.min(), bmax.max(), torch.maximum(-bmin, bmax)
        rest = flat[n_blocks * TAIL_BLOCK :]
        if rest.numel():
            lo, hi = torch.minimum(lo, rest.min()), torch.maximum(hi, rest.max())
            tail = torch.cat([tail, rest.abs()])
        return lo, hi, tail

    def observe(
        self,
        x2: torch.Tensor,
        amax: torch.Tensor | float,
        batch_index: int,
        valid: torch.Tensor | None = None,
        tail: torch.Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            x2: finite values, shape ``(rows, n)`` (entries masked out by ``valid`` may be anything).
            amax: exact ``max |x|`` of the batch, a float (one row) or a ``(rows,)`` tensor.
            batch_index: index of this batch; rotates the sampling offset.
            valid: optional boolean mask shaped like ``x2``; False entries are not counted.
            tail: per-tensor only, the block maxima of ``|x|`` from :meth:`block_extremes`; when given and
                the batch is subsampled, the top bins come from them (see the module docstring).
        """
        rows, length = x2.shape
        bins = self.bins
        if rows == 1:
            amax_f = float(amax)
            cur = float(self.hist_range[0])
            if amax_f > cur:
                mant, exp = math.frexp(amax_f)
                self.rebin(
                    self.hist_range.new_full((1,), max(amax_f if mant == 0.5 else 2.0**exp, RANGE_MIN))
                )
        else:
            target = torch.maximum(pow2_ceil(torch.as_tensor(amax)), self.hist_range)
            if bool((target > self.hist_range).any()):
                self.rebin(target)
        cap = self.sample_cap(length)
        sample, kept_full = x2, None
        if valid is not None:
            kept_full = valid.sum(1, dtype=torch.float64)
        if length <= cap:
            tail = None
        elif rows == 1 and valid is None:  # whole chunks of SAMPLE_CHUNK elements: one cache line each
            n_chunks = length // SAMPLE_CHUNK
            step = _prime_at_least(-(-n_chunks * SAMPLE_CHUNK // cap))
            chunks = x2.reshape(-1)[: n_chunks * SAMPLE_CHUNK].reshape(n_chunks, SAMPLE_CHUNK)
            sample = chunks[batch_index % step :: step]  # (m, SAMPLE_CHUNK); |.| is made contiguous below
        else:
            step = _prime_at_least(-(-length // cap))
            sample = x2[:, batch_index % step :: step]
            valid = None if valid is None else valid[:, batch_index % step :: step]
        a = sample.abs() if sample.dtype in (torch.float32, torch.float64) else sample.float().abs()
        a = a.reshape(rows, -1)
        taken = a.shape[1]
        if rows == 1 and valid is None:
            inv_w = bins / max(float(self.hist_range[0]), RANGE_MIN)
            counts = torch.bincount(a.mul_(inv_w).ceil_().reshape(-1).long(), minlength=bins + 1)
            if tail is None:
                self.counts[0].add_(counts, alpha=length / taken)
                return
            tail = tail.float() if tail.dtype not in (torch.float32, torch.float64) else tail
            top = torch.bincount((tail * inv_w).ceil_().long(), minlength=bins + 1)
            # cut = first bin with at most TAIL_SHARE of the block maxima above it
            cut = (top.cumsum(0) < tail.numel() * (1 - TAIL_SHARE)).sum()
            bulk = counts.double() * (length / taken)
            self.counts[0].add_(torch.where(self.bin_index <= cut, bulk, top.double()))
            return
        inv_w = (bins / self.hist_range.clamp_min(RANGE_MIN)).to(a.dtype)
        idx = a.mul_(inv_w[:, None]).ceil_().long()
        idx += torch.arange(rows, device=idx.device)[:, None] * (bins + 1)
        n_bins = rows * (bins + 1)
        if valid is None:
            counts = torch.bincount(idx.reshape(-1), minlength=n_bins).view(rows, bins + 1)
            self.counts.add_(counts, alpha=length / taken)
            return
        idx = torch.where(valid, idx, n_bins)
        counts = torch.bincount(idx.reshape(-1), minlength=n_bins + 1)[:n_bins].view(rows, bins + 1)
        kept = valid.sum(1, dtype=torch.float64)
        weight = torch.where(kept > 0, kept_full / kept.clamp_min(1), 0.0)
        self.counts.add_(counts * weight[:, None])

    def reduce(self, group: object | None = None) -> None:
        """All-reduce across ranks: MAX of the ranges, exact local re-bin to them, then SUM of the counts."""
        common = self.hist_range.clone()
        dist.all_reduce(common, op=dist.ReduceOp.MAX, group=group)
        self.rebin(common)
        dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
