"""Histogram statistics of ``|x|`` and the threshold searches built on them (percentile, kl, mse, mix).

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

The searches return a clipping threshold per row (``scale = threshold / qmax``); they never modify the
statistics, so one set of statistics serves int8 and int16.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "RANGE_MIN",
    "DEFAULT_BINS",
    "DEFAULT_MAX_SAMPLES",
    "AbsHistogram",
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
DEFAULT_MAX_SAMPLES: int = 2**15
MIN_BINS, MAX_BINS = 256, 2**16
MIN_SAMPLES_PER_ROW: int = 4096
TAIL_BLOCK: int = 256
SAMPLE_CHUNK: int = 16
TAIL_SHARE: float = 1 / 32
MIX_CANDIDATES: tuple[str, ...] = ("minmax", "percentile", "kl", "mse")
_MSE_GRID_WORK = 2**16  # rows * coarse candidates evaluated by mse_threshold
_SEARCH_CELLS = 2**17  # rows * bins searched by kl / mse / mix (see coarsen)
_KL_WORK = 2**16  # rows * candidates evaluated by kl_threshold (stride > 1 only for many channels)
_MSE_REFINE = 33


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


# ----------------------------------------------------------------------------------------------------------
# Threshold searches. counts: (rows, bins + 1) float64, width: (rows,), amax: (rows,) exact max |x|.
# ----------------------------------------------------------------------------------------------------------


class _Moments(NamedTuple):
    """Prefix sums of one histogram under a uniform density inside each bin."""

    counts: torch.Tensor  # (rows, bins + 1) float64
    width: torch.Tensor  # (rows, 1), 1 where the range is 0 (only exact zeros seen)
    f0: torch.Tensor  # inclusive prefix sums of count, sum |x|, sum x**2 per bin
    f1: torch.Tensor
    f2: torch.Tensor


def coarsen(counts: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge groups of adjacent bins (exactly) so that ``rows * bins <= 2**17`` (at least 256 bins).

    Only many-channel histograms are affected (a per-tensor histogram is returned as is); it bounds the
    cost of the kl / mse / mix searches per channel. The exact-zero column is kept.
    """
    rows, bins = counts.shape[0], counts.shape[1] - 1
    keep = max(MIN_BINS, _SEARCH_CELLS // rows)
    if bins <= keep:
        return counts, width
    group = bins // (1 << (keep.bit_length() - 1))  # power of two, as bins is one
    merged = counts[:, 1:].reshape(rows, bins // group, group).sum(-1)
    return torch.cat([counts[:, :1], merged], 1), width * group


def _moments(counts: torch.Tensor, width: torch.Tensor) -> _Moments:
    counts = counts.double()
    bins = counts.shape[1] - 1
    w = torch.where(width > 0, width.double(), 1.0)[:, None]
    j = torch.arange(bins + 1, dtype=torch.float64, device=counts.device)
    lo = (j - 1).clamp_min(0) * w
    hi = j * w
    m1 = (lo + hi) / 2
    m2 = (lo * lo + lo * hi + hi * hi) / 3  # both 0 for bin 0 (exact zeros)
    return _Moments(counts, w, counts.cumsum(1), (counts * m1).cumsum(1), (counts * m2).cumsum(1))


def _below(m: _Moments, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, sum |x| and sum x**2 of the elements with ``|x| <= u`` (u: (rows, T))."""
    bins = m.counts.shape[1] - 1
    w = m.width
    u = torch.minimum(u.clamp_min(0), w * bins)
    i = torch.ceil(u / w).clamp_(1, bins).long()
    lo = (i - 1).double() * w
    dens = m.counts.gather(1, i) / w
    f0, f1, f2 = (p.gather(1, i - 1) for p in (m.f0, m.f1, m.f2))
    lo2, u2 = lo * lo, u * u
    return f0 + dens * (u - lo), f1 + dens * (u2 - lo2) / 2, f2 + dens * (u2 * u - lo2 * lo) / 3


def _mse(m: _Moments, t: torch.Tensor, qmax: int) -> torch.Tensor:
    t = t.double().clamp_min(0)
    n0, n1, n2 = m.f0[:, -1:], m.f1[:, -1:], m.f2[:, -1:]
    s = t / qmax
    z0, _, z2 = _below(m, s / 2)
    c0, c1, c2 = _below(m, t)
    clip = ((n2 - c2) - 2 * t * (n1 - c1) + t * t * (n0 - c0)).clamp_min(0)
    err = z2 + s * s / 12 * (c0 - z0).clamp_min(0) + clip
    return err / n0.clamp_min(1e-300)


def estimate_mse(
    counts: torch.Tensor, width: torch.Tensor, thresholds: torch.Tensor, qmax: int
) -> torch.Tensor:
    """Histogram estimate of the mean squared quantization error for each candidate threshold.

    With ``s = t / qmax``: elements with ``|x| < s / 2`` round to 0 (error ``x**2``, exact zeros cost 0),
    elements in ``[s / 2, t]`` cost the uniform rounding error ``s**2 / 12``, elements above ``t`` are
    clipped (error ``(|x| - t)**2``). Inside a bin values are taken as uniformly spread. The negative side
    is treated like the positive one (clip at ``qmax * s``, not ``(qmax + 1) * s``).

    Args:
        counts: ``(rows, bins + 1)`` histogram (see :class:`AbsHistogram`).
        width: ``(rows,)`` bin widths.
        thresholds: ``(rows, T)`` candidate thresholds.
        qmax: largest integer code of the dtype.

    Returns:
        ``(rows, T)`` float64 estimated mean squared error (0 for empty rows).
    """
    return _mse(_moments(counts, width), thresholds, qmax)


def percentile_threshold(
    counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, q: float
) -> torch.Tensor:
    """Return the ``q``-th percentile (``0 < q <= 100``) of ``|x|``, interpolated inside its bin.

    Returns ``amax`` for ``q == 100`` and for empty rows; never more than ``amax``.
    """
    amax = amax.double()
    if q >= 100:
        return amax
    counts = counts.double()
    total = counts.sum(1, keepdim=True)
    cum = counts.cumsum(1)
    target = total * (q / 100.0)
    i = torch.searchsorted(cum, target).clamp_(max=counts.shape[1] - 1)
    prev = torch.where(i > 0, cum.gather(1, (i - 1).clamp_min(0)), 0.0)
    h = counts.gather(1, i)
    frac = ((target - prev) / h.clamp_min(1e-300)).clamp(0, 1)
    val = torch.where(i > 0, ((i - 1).double() + frac) * width.double()[:, None], 0.0).squeeze(1)
    return torch.where(total.squeeze(1) > 0, torch.minimum(val, amax), amax)


def _mse_search(m: _Moments, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    rows = m.counts.shape[0]
    n_grid = int(min(2048, max(64, _MSE_GRID_WORK // rows)))
    k = torch.arange(1, n_grid + 1, dtype=torch.float64, device=amax.device)
    grid = amax[:, None] * k / n_grid
    best = _mse(m, grid, qmax).argmin(1)
    lo = amax * best.double() / n_grid  # grid point below the best one (0 for the first)
    hi = torch.minimum(amax * (best.double() + 2) / n_grid, amax)
    f = torch.linspace(0, 1, _MSE_REFINE, dtype=torch.float64, device=amax.device)
    fine = torch.cat([lo[:, None] + (hi - lo)[:, None] * f[1:], grid.gather(1, best[:, None])], 1)
    thr = fine.gather(1, _mse(m, fine, qmax).argmin(1, keepdim=True)).squeeze(1)
    return torch.where((m.f0[:, -1] > 0) & (amax > 0), torch.minimum(thr, amax), amax)


def mse_threshold(counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Threshold in ``(0, amax]`` minimising :func:`estimate_mse` for ``qmax``.

    A coarse grid ``amax * k / T`` (``T = 2048`` per tensor, fewer per channel so that ``rows * T <= 2**16``,
    at least 64) is refined with 32 points between the neighbours of the best grid point. Many-channel
    histograms are searched after :func:`coarsen`.
    """
    return _mse_search(_moments(*coarsen(counts, width)), amax.double(), qmax)


def _cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[:, idx]`` for a 2-D ``t`` via ``index_select`` (much faster than advanced indexing on CPU)."""
    return t.index_select(1, idx.reshape(-1)).view(t.shape[0], *idx.shape)


def kl_threshold(counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """TensorRT-style entropy calibration on the ``|x|`` histogram.

    Algorithm (TensorRT / MXNet ``_get_optimal_threshold``) on the ``bins`` equal bins of ``(0, range]``,
    with ``nq = qmax + 1`` quantized levels and ``J`` the number of bins up to the last non-empty one.
    Exact zeros are left out, like NVIDIA pytorch-quantization's ``bins[0] = bins[1]``: a ReLU spike at 0
    would otherwise dominate the divergence and drag the threshold down. For each candidate ``i`` in
    ``[nq, J]``:

    * ``P`` = bins ``0 .. i-1``, with the count of all bins ``>= i`` (outliers) added to bin ``i-1``;
    * ``Q`` = bins ``0 .. i-1`` merged into ``nq`` groups of ``m = i // nq`` bins (the last group takes
      the remainder); each group's total is spread evenly over the bins where ``P`` is non-zero;
      ``Q = 0`` where ``P = 0``;
    * ``KL(P / sum P || Q / sum Q)``; a ``P > 0`` bin with ``Q = 0`` makes it infinite (no smoothing).

    The threshold is the upper edge ``i * w`` of the best candidate (ties: the smallest), capped at ``amax``.

    Vectorised exactly, without a loop over candidates: ``KL = (sum p log p - sum_g Sp_g log(S_g / n_g))
    / N + log(M / N)`` (``S_g``: group total, ``n_g``: its non-zero bins, ``Sp_g``: its ``P`` total,
    ``N``/``M``: totals of ``P``/``Q``). All groups but the last depend only on ``m``, so their sum is
    computed once per distinct ``m`` (``bins // nq`` values); the last group, ``p log p`` and the totals
    come from prefix sums per candidate: cost ``O(rows * (bins // nq * nq + bins))``. With many channels
    the histogram is first merged by :func:`coarsen` and the candidates are strided so that
    ``rows * candidates <= 2**16`` (per tensor: every bin, every candidate).

    When ``nq > J`` (int16: 32768 levels, finer than a 2048-bin histogram) nothing is searched: every
    level is finer than a bin, so the result is ``amax``.
    """
    amax = amax.double()
    counts, width = coarsen(counts, width)
    rows, bins = counts.shape[0], counts.shape[1] - 1
    nq = qmax + 1
    h = counts[:, 1:].double()  # exact zeros left out (see docstring)
    nonzero = h > 0
    last = torch.where(nonzero, torch.arange(1, bins + 1, device=h.device), 0).amax(1)  # J per row
    if nq > bins or not bool((last >= nq).any()):
        return amax
    zero = h.new_zeros(rows, 1)
    cum = torch.cat([zero, h.cumsum(1)], 1)
    cnz = torch.cat([zero, nonzero.double().cumsum(1)], 1)
    hlogh = torch.cat([zero, torch.where(nonzero, h * torch.log(h.clamp_min(1e-300)), 0.0).cumsum(1)], 1)
    total = cum[:, -1:]
    top = int(last.max())  # no candidate beyond the last non-empty bin of any row
    # groups 0 .. nq-2 for every merge width m = 1 .. top // nq
    ms = torch.arange(1, top // nq + 1, device=h.device)
    g_start = torch.arange(nq - 1, device=h.device)[None, :] * ms[:, None]  # (M, nq-1)
    g_end = g_start + ms[:, None]
    s = _cols(cum, g_end) - _cols(cum, g_start)  # (rows, M, nq-1)
    n = _cols(cnz, g_end) - _cols(cnz, g_start)
    base = torch.where(s > 0, s * torch.log(s / n.clamp_min(1)), 0.0).sum(-1)  # (rows, M)
    # per candidate: last group, outliers, p log p
    stride = max(1, -(-rows * (top - nq + 1) // _KL_WORK))  # 1 per tensor; coarser for many channels
    cand = torch.arange(nq, top + 1, stride, device=h.device)
    merged = cand // nq
    l_start = (nq - 1) * merged
    inside = _cols(cum, cand)
    outliers = (total - inside).clamp_min(0)
    last_bin = _cols(h, cand - 1)
    s_l = inside - _cols(cum, l_start)
    n_l = _cols(cnz, cand) - _cols(cnz, l_start) + ((outliers > 0) & (last_bin == 0)).double()
    sp_l = s_l + outliers
    q_log = _cols(base, merged - 1) + torch.where(sp_l > 0, sp_l * torch.log(s_l / n_l.clamp_min(1)), 0.0)
    p_last = last_bin + outliers
    p_log = _cols(hlogh, cand - 1) + torch.where(
        p_last > 0, p_last * torch.log(p_last.clamp_min(1e-300)), 0.0
    )
    kl = (p_log - q_log) / total + torch.log(inside.clamp_min(1e-300) / total)
    kl = torch.where(cand[None, :] <= last[:, None], kl, torch.inf).nan_to_num(nan=torch.inf)
    best = cand[kl.argmin(1)].double() * width.double()
    return torch.where(last >= nq, torch.minimum(best, amax), amax)


def mix_candidates(
    counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int, percentile: float = 99.99
) -> torch.Tensor:
    """Return the minmax, percentile, kl and mse thresholds, shape ``(rows, 4)`` (MIX_CANDIDATES order)."""
    counts, width = coarsen(counts, width)
    return _mix(_moments(counts, width), counts, width, amax.double(), qmax, percentile)[0]


def _mix(
    m: _Moments, counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int, percentile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    cands = torch.stack(
        [
            amax,
            percentile_threshold(counts, width, amax, percentile),
            kl_threshold(counts, width, amax, qmax),
            _mse_search(m, amax, qmax),
        ],
        1,
    )
    return cands, _mse(m, cands, qmax)


def mix_threshold(
    counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the :func:`mix_candidates` threshold with the lowest :func:`estimate_mse`.

    Returns:
        ``(threshold (rows,), winner (rows,) index into MIX_CANDIDATES)``; ties go to the earlier name.
    """
    counts, width = coarsen(counts, width)
    cands, err = _mix(_moments(counts, width), counts, width, amax.double(), qmax, percentile)
    win = err.argmin(1)
    return cands.gather(1, win[:, None]).squeeze(1), win
