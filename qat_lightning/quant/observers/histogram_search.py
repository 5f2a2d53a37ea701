"""Threshold searches on an ``|x|`` histogram: ``percentile``, ``mse``, ``kl`` and ``mix``.

Every search takes the histogram of :class:`~.histogram.AbsHistogram` (``counts`` of
shape ``(rows, bins + 1)``, bin widths ``(rows,)``) and the exact ``max |x|`` per row, and returns a
clipping threshold per row (``scale = threshold / qmax``), never more than ``amax``. They never modify the
statistics, so one set of statistics serves int8 and int16. All rows (channels) are searched at once;
many-channel histograms are first merged by :func:`~.histogram_error.coarsen`.
"""

from __future__ import annotations

import torch

from qat_lightning.quant.observers.histogram_error import (
    SEARCH_CELLS,
    Moments,
    all_rows,
    coarsen,
    edge_argmin,
    estimate_mse,
    moments,
    mse_at,
)
from qat_lightning.quant.observers.kl_search import KL_TOLERANCE, kl_threshold

__all__ = [
    "SEARCH_CELLS",
    "KL_TOLERANCE",
    "MIX_CANDIDATES",
    "coarsen",
    "estimate_mse",
    "percentile_threshold",
    "mse_threshold",
    "kl_threshold",
    "mix_candidates",
    "mix_threshold",
]

MIX_CANDIDATES: tuple[str, ...] = ("minmax", "percentile", "mse", "kl")
_REFINE = 16  # points of the refinement of mse_threshold


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


def _mse_search(
    m: Moments, amax: torch.Tensor, qmax: int, extra: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the :func:`mse_threshold` search on moments ``m``.

    Returns:
        ``(threshold, its error, errors of extra)`` (``(rows,)``, ``(rows,)``, ``(rows, E)``):
        ``extra`` (``(rows, E)``) are further thresholds evaluated in the same pass.
    """
    rows = all_rows(m)
    top = int(torch.ceil(amax[:, None] / m.width).max().clamp(1, m.bins))
    coarse = edge_argmin(m, 1, top, qmax)  # every edge up to the first one >= amax
    best = torch.minimum((coarse[:, None] + 1) * m.width, amax[:, None])
    k = torch.arange(1, _REFINE + 1, dtype=torch.float64, device=amax.device)
    pts = (best - m.width + m.width / (_REFINE // 2) * k).minimum(amax[:, None])
    if extra is not None:
        pts = torch.cat([pts, extra.double()], 1)
    err = mse_at(m, rows, pts, qmax)
    j = err[:, :_REFINE].argmin(1, keepdim=True)
    ok = (m.totals[0, :, 0] > 0) & (amax > 0)
    return torch.where(ok, pts.gather(1, j)[:, 0], amax), err.gather(1, j)[:, 0], err[:, _REFINE:]


def mse_threshold(counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Threshold in ``(0, amax]`` minimising :func:`estimate_mse` for ``qmax``.

    Coarse stage: every bin edge ``i * w`` up to the first one at or above ``amax``; the best one
    ``b`` (capped at ``amax``) is refined with the 16 points ``b - w + k w / 8`` (``k = 1 .. 16``,
    capped at ``amax``; ``b`` is one of them), and the best of those wins (ties: the smaller point).
    Many-channel histograms are searched after :func:`coarsen`.
    """
    counts, width = coarsen(counts, width)
    return _mse_search(moments(counts, width), amax.double(), qmax)[0]


def mix_candidates(
    counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int, percentile: float = 99.99
) -> torch.Tensor:
    """Return the minmax, percentile, mse and kl thresholds, shape ``(rows, 4)`` (MIX_CANDIDATES order)."""
    counts, width = coarsen(counts, width)
    amax = amax.double()
    m = moments(counts, width)
    return torch.stack(
        [
            amax,
            percentile_threshold(counts, width, amax, percentile),
            _mse_search(m, amax, qmax)[0],
            kl_threshold(counts, width, amax, qmax, m=m),
        ],
        1,
    )


def mix_threshold(
    counts: torch.Tensor, width: torch.Tensor, amax: torch.Tensor, qmax: int, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the :func:`mix_candidates` threshold with the lowest :func:`estimate_mse`.

    Ties go to the earlier name of :data:`MIX_CANDIDATES`. The kl candidate is never computed here: it
    is a bin edge (or ``amax``), and the mse search evaluates every bin edge (and keeps the best one
    among its refined points) while minmax is ``amax``, so kl can at most tie with an earlier name.

    Returns:
        ``(threshold (rows,), winner (rows,) index into MIX_CANDIDATES)``.
    """
    counts, width = coarsen(counts, width)
    amax = amax.double()
    m = moments(counts, width)
    pct = percentile_threshold(counts, width, amax, percentile)
    thr, err, others = _mse_search(m, amax, qmax, torch.stack([amax, pct], 1))
    win = torch.cat([others, err[:, None]], 1).argmin(1)  # minmax, percentile, mse
    return torch.stack([amax, pct, thr], 1).gather(1, win[:, None]).squeeze(1), win
