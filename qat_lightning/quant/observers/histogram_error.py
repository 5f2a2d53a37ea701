"""Quantization-error model on an ``|x|`` histogram, shared by the threshold searches.

Histogram layout (see :class:`~.histogram.AbsHistogram`): ``counts`` of shape
``(rows, bins + 1)``, column 0 the exact zeros, column ``j >= 1`` the values in ``((j - 1) w, j w]`` for the
row's bin width ``w``. Inside a bin values are taken as uniformly spread.

All functions work on every row at once (one row per channel, a single row per tensor) and return float64.
:func:`moments`, :func:`mse_at` and :func:`edge_mse` run the fused C kernels of
:mod:`..backends.search_kernels` on CPU when built (bit-identical results), else the ATen code here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qat_lightning.quant.backends import search_kernels

__all__ = [
    "SEARCH_CELLS",
    "search_bins",
    "coarsen",
    "Moments",
    "moments",
    "all_rows",
    "mse_at",
    "edge_mse",
    "edge_argmin",
    "estimate_mse",
]

SEARCH_CELLS: int = 2**16
"""Most ``rows * bins`` cells the kl / mse / mix searches work on (see :func:`coarsen`)."""
_MIN_SEARCH_BINS = 256


def search_bins(rows: int) -> int:
    """Most bins per row the kl / mse / mix searches use: the largest power of two ``<= 2**16 / rows``.

    At least 256; histograms with more bins per row are merged to this count by :func:`coarsen`.
    """
    keep = max(_MIN_SEARCH_BINS, SEARCH_CELLS // max(rows, 1))
    return 1 << (keep.bit_length() - 1)


def coarsen(counts: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge groups of adjacent bins (exactly) so that ``rows * bins <= 2**16`` (at least 256 bins).

    Only many-channel histograms are affected (a per-tensor histogram is returned as is); it bounds the
    cost of the kl / mse / mix searches per channel. The exact-zero column is kept. Every row is merged
    the same way, so a per-channel search equals the per-tensor search run on each coarsened row. The
    kl / mse / mix observers build their per-channel histograms with :func:`search_bins` bins by default,
    so this is a no-op for them unless ``bins`` was given explicitly.
    """
    rows, bins = counts.shape[0], counts.shape[1] - 1
    keep = search_bins(rows)
    if bins <= keep:
        return counts, width
    group = bins // keep  # power of two, as bins and keep are
    merged = counts[:, 1:].reshape(rows, bins // group, group).sum(-1)
    return torch.cat([counts[:, :1], merged], 1), width * group


class Moments(NamedTuple):
    """Prefix sums of one histogram under a uniform density inside each bin.

    ``pre`` (``(3, rows, bins + 1)``) holds the inclusive prefix sums of the count, ``sum |x|`` and
    ``sum x**2`` per bin (``f0``/``f1``/``f2`` are its three planes) and ``totals`` (``(3, rows, 1)``)
    their last column; ``counts`` is the histogram, ``width`` the bin widths (``(rows, 1)``, 1 where a
    row saw only exact zeros).
    """

    bins: int
    width: torch.Tensor
    counts: torch.Tensor
    pre: torch.Tensor
    totals: torch.Tensor

    @property
    def f0(self) -> torch.Tensor:
        """Prefix sums of the counts, ``(rows, bins + 1)``."""
        return self.pre[0]

    @property
    def f1(self) -> torch.Tensor:
        """Prefix sums of ``|x|``, ``(rows, bins + 1)``."""
        return self.pre[1]

    @property
    def f2(self) -> torch.Tensor:
        """Prefix sums of ``x**2``, ``(rows, bins + 1)``."""
        return self.pre[2]


def moments(counts: torch.Tensor, width: torch.Tensor) -> Moments:
    """Prefix sums of ``counts`` (``(rows, bins + 1)``) with bin widths ``width`` (``(rows,)``)."""
    counts = counts.double()
    cells = counts.shape[1]
    fused = search_kernels.moments(counts, width)
    if fused is not None:
        w, pre = fused
        return Moments(cells - 1, w, counts, pre, pre[:, :, -1:])
    w = torch.where(width > 0, width.double(), 1.0)[:, None]
    j = torch.arange(cells, dtype=torch.float64, device=counts.device)
    lo = (j - 1).clamp_min(0)  # bin j covers (lo w, j w]; bin 0 (exact zeros) has both 0
    pre = counts.new_empty(3, *counts.shape)
    torch.cumsum(counts, 1, out=pre[0])
    torch.cumsum(counts * ((lo + j) / 2), 1, out=pre[1]).mul_(w)
    torch.cumsum(counts * ((lo * lo + lo * j + j * j) / 3), 1, out=pre[2]).mul_(w * w)
    return Moments(cells - 1, w, counts, pre, pre[:, :, -1:])


def all_rows(m: Moments) -> torch.Tensor:
    """Row index ``(rows, 1)`` for :func:`mse_at` with thresholds of shape ``(rows, T)``."""
    return torch.arange(m.width.shape[0], device=m.width.device)[:, None]


def mse_at(m: Moments, row: torch.Tensor, t: torch.Tensor, qmax: int) -> torch.Tensor:
    """Estimated mean squared error of threshold ``t`` for row ``row`` (see :func:`estimate_mse`).

    Args:
        m: :func:`moments` of the histogram.
        row: row index of each threshold: ``(K,)`` with ``t`` of shape ``(K,)``, or ``(rows, 1)`` (every
            row, ``t`` of shape ``(rows, T)``).
        t: thresholds.
        qmax: largest integer code of the dtype.
    """
    fused = search_kernels.mse_at(m.pre, m.counts, m.width, row, t, qmax)
    if fused is not None:
        return fused
    if row.dim() == 1:
        w, n = m.width[row, 0], m.totals[:, row, 0]
    else:
        w, n = m.width, m.totals
    t = torch.minimum(t.double().clamp_min(0), w * m.bins)
    x = torch.stack([t / (2 * qmax), t]) / w  # in bins: the rounding-to-zero point s / 2, and t
    k = x.ceil().clamp_(1, m.bins)  # the bin holding each point
    prev = k - 1
    flat = k.long() + row * (m.bins + 1)
    count = m.counts.view(-1).index_select(0, flat.view(-1)).view(flat.shape)
    got = m.pre.view(3, -1).index_select(1, flat.view(-1).sub_(1)).view(3, *flat.shape)
    part = x - prev  # share of bin k below the point
    coef = torch.stack(
        [part, (x + prev).mul_(part).mul_(w / 2), (x * x * x - prev * prev * prev).mul_(w * w / 3)]
    )
    z, c = got.addcmul_(count, coef).unbind(1)  # count, sum |x|, sum x**2 below s / 2 and below t
    above = n - c
    clip = torch.addcmul(above[1], above[0], t, value=-0.5).mul_(-2 * t).add_(above[2]).clamp_min_(0)
    rounding = (c[0] - z[0]).clamp_min_(0).mul_(t * t / (12 * qmax * qmax))
    return clip.add_(rounding).add_(z[2]).div_(n[0].clamp_min(1e-300))


def edge_mse(m: Moments, first: int, last: int, qmax: int) -> torch.Tensor:
    """:func:`mse_at` of the bin edges ``t = i * w``, ``i = first .. last``, for every row: ``(rows, C)``.

    The same estimate, from slices of the prefix sums instead of one look-up per threshold.
    """
    fused = search_kernels.edge_mse(m.pre, m.counts, m.width, first, last, qmax)
    if fused is not None:
        return fused[0]
    w = m.width
    i = torch.arange(first, last + 1, dtype=torch.float64, device=w.device)
    t = w * i
    x = i / (2 * qmax)  # the rounding-to-zero point s / 2, in bins: the same for every row
    k = x.ceil().clamp_(1, m.bins)
    prev = k - 1
    # k is constant over runs of edges: expand each run's (count, f0, f2) instead of gathering per edge
    kv, runs = torch.unique_consecutive(k.long(), return_counts=True)
    table = torch.stack(
        [m.counts.index_select(1, kv), m.f0.index_select(1, kv - 1), m.f2.index_select(1, kv - 1)]
    )
    c, f0, f2 = torch.cat([table[:, :, j : j + 1].expand(-1, -1, n) for j, n in enumerate(runs.tolist())], 2)
    z0 = f0.addcmul_(c, x - prev)
    z2 = f2.addcmul_(c, (x * x * x - prev * prev * prev) / 3 * (w * w))
    cut = m.pre[:, :, first : last + 1]
    above = m.totals - cut  # count, sum |x|, sum x**2 above t
    clip = torch.addcmul(above[1], above[0], t, value=-0.5).mul_(-2 * t).add_(above[2]).clamp_min_(0)
    rounding = (cut[0] - z0).clamp_min_(0)
    return (
        clip.addcmul_(rounding, (w * w / (12 * qmax * qmax)) * (i * i))
        .add_(z2)
        .div_(m.totals[0].clamp_min(1e-300))
    )


def edge_argmin(m: Moments, first: int, last: int, qmax: int) -> torch.Tensor:
    """``edge_mse(m, first, last, qmax).argmin(1)``, ``(rows,)`` (one pass with the kernel)."""
    fused = search_kernels.edge_mse(m.pre, m.counts, m.width, first, last, qmax, with_argmin=True)
    if fused is not None and fused[1] is not None:
        return fused[1]
    return edge_mse(m, first, last, qmax).argmin(1)


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
    m = moments(counts, width)
    return mse_at(m, all_rows(m), thresholds, qmax)
