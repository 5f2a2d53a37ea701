"""KL-divergence (entropy) calibration on an ``|x|`` histogram: :func:`kl_threshold`."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from qat_lightning.quant.backends import search_kernels
from qat_lightning.quant.observers.histogram_error import Moments, coarsen, moments, mse_at

__all__ = ["KL_TOLERANCE", "KL_MAX_MSE_LOSS", "kl_threshold", "kl_divergences"]

KL_TOLERANCE: float = 0.05
"""Relative tolerance of the kl tie-break: candidates with ``KL <= (1 + KL_TOLERANCE) * min KL`` tie."""
KL_MAX_MSE_LOSS: float = 0.02
"""The kl guard: the threshold's estimated error stays within ``1 + KL_MAX_MSE_LOSS`` (0.09 dB) of the
smallest estimated error among the candidates."""
_KL_ABS_SLACK = 1e-12  # absorbs float rounding when the minimum divergence is (close to) 0


def kl_threshold(
    counts: torch.Tensor,
    width: torch.Tensor,
    amax: torch.Tensor,
    qmax: int,
    tolerance: float = KL_TOLERANCE,
    m: Moments | None = None,
    max_mse_loss: float = KL_MAX_MSE_LOSS,
) -> torch.Tensor:
    """Entropy calibration (TensorRT / NVIDIA modelopt style) on the ``|x|`` histogram, per row.

    On the ``B`` equal bins of ``(0, range]`` (bin ``j = 0 .. B-1`` holds ``(j w, (j + 1) w]``), with
    ``nq = qmax + 1`` quantized levels and ``J`` the number of bins up to the last non-empty one. Exact
    zeros are left out, like NVIDIA pytorch-quantization's ``bins[0] = bins[1]`` (a ReLU spike at 0 would
    otherwise dominate the divergence). For each candidate ``i`` in ``[nq, J]`` (threshold ``i * w``):

    * ``P`` = bins ``0 .. i-1``, with the count of all bins ``>= i`` (the clipped mass) added to bin
      ``i-1``;
    * ``Q``: bins ``0 .. i-1`` are split into ``nq`` consecutive groups (quantized levels) whose sizes
      differ by at most one: with ``m = i // nq`` and ``r = i % nq``, the first ``r`` groups have
      ``m + 1`` bins, the other ``nq - r`` have ``m`` (NVIDIA modelopt splits evenly too, with the larger
      groups interleaved; TensorRT/MXNet's "``m`` bins each, the remainder to the last group" makes the
      top level up to twice as wide as the others). Each group's total (clipped mass excluded) is spread
      evenly over its bins where ``P > 0``; ``Q = 0`` where ``P = 0``. Bin ``i-1`` counts as non-empty
      when it only holds clipped mass, so clipping never makes the divergence infinite by itself;
    * ``KL(P / sum P || Q / sum Q)``; a ``P > 0`` bin with ``Q = 0`` (a top group holding only clipped
      mass) makes it infinite (no smoothing).

    Tie-break: every candidate whose divergence is at most ``(1 + tolerance) * min KL + 1e-12``
    (``tolerance`` defaults to :data:`KL_TOLERANCE`, 5 %) counts as minimal, and among those the one
    with the smallest :func:`~.histogram_error.estimate_mse` of its threshold wins
    (then the smallest ``i``). The threshold is ``i * w``, capped at ``amax``. The divergence decides
    the band; the error only orders thresholds the divergence cannot tell apart (on ReLU(Gaussian) data
    the plain minimum clips 0.6 dB of SQNR too little, see ``benchmarks/README.md``).

    Exact, without a loop over candidates: ``KL = (sum_g D_g + C_i) / N + log(sum_{j<i} h_j / N)`` with
    ``N`` the row total, ``D_g = sum_{j in g} h_j log h_j - S_g log(S_g / n_g)`` (``S_g``, ``n_g``: the
    group's total and non-empty bins; ``D_g >= 0``, no cancellation) for every group but the top one,
    and ``C_i`` the top group's term with the clipped mass. For ``i <= 2 nq`` the groups are pairs and
    single bins (prefix sums over pairs); beyond, ``D`` of the groups of ``L`` bins starting at every
    needed bin, summed along chains of stride ``L`` (suffix sums), gives the sum over any run of equal
    groups by two look-ups. With many channels the histogram is first merged by
    :func:`~.histogram_error.coarsen` (per tensor: every bin, every candidate).

    Guard (``max_mse_loss``, default :data:`KL_MAX_MSE_LOSS`): the divergence weighs every element
    alike, whatever its magnitude, so on heavy tails (Student-t(3)) its minimum clips far more than an
    SQNR-optimal threshold (4-14 dB of SQNR below torch.ao's ``HistogramObserver`` on small
    calibration sets, where the first candidate, ``nq`` bins, is a small share of a short range). When
    the pick's estimated error exceeds ``(1 + max_mse_loss)`` times the smallest estimated error over
    the candidates, the pick becomes the candidate of smallest divergence among those within that
    bound (ties: smallest error, then smallest ``i``). The divergence still chooses among thresholds
    of about equal error; it can no longer cost more than ``10 log10(1 + max_mse_loss)`` dB of estimated
    SQNR (0.09 dB). ``max_mse_loss=math.inf`` gives the unguarded entropy calibration. The guard runs
    on the ATen code (the fused kernels compute the divergences and the band pick before it).

    When ``nq > J`` (int16: 32768 levels, finer than a 2048-bin histogram) nothing is searched: every
    level is finer than a bin, so the result is ``amax``.

    Args:
        counts: ``(rows, bins + 1)`` histogram (column 0: exact zeros).
        width: ``(rows,)`` bin widths.
        amax: ``(rows,)`` exact ``max |x|``.
        qmax: largest integer code of the dtype.
        tolerance: relative tolerance of the tie-break (0: plain minimum of the divergence).
        m: :func:`~.histogram_error.moments` of the coarsened histogram, if at hand.
        max_mse_loss: the guard's relative error bound (``math.inf``: no guard).

    Returns:
        ``(rows,)`` float64 thresholds.
    """
    amax = amax.double()
    counts, width = coarsen(counts, width)
    nq = qmax + 1
    if nq > counts.shape[1] - 1:  # every level finer than a bin (kl_divergences has no candidate)
        return amax
    cand, kl, last = kl_divergences(counts, nq)
    if cand is None:
        return amax
    m = moments(counts, width) if m is None else m
    thr = search_kernels.kl_pick(
        kl, int(cand[0]), m.pre, m.counts, m.width, amax, last, nq, qmax, tolerance, _KL_ABS_SLACK
    )
    if thr is None:
        thr = _band_pick(kl, cand, m, amax, last, nq, qmax, tolerance)
    if math.isinf(max_mse_loss):
        return thr
    return _guard(kl, cand, m, amax, last, qmax, thr, max_mse_loss)


def _band_pick(
    kl: torch.Tensor,
    cand: torch.Tensor,
    m: Moments,
    amax: torch.Tensor,
    last: torch.Tensor,
    nq: int,
    qmax: int,
    tolerance: float,
) -> torch.Tensor:
    """Break kl_threshold's tie: smallest error in the divergence band, then smallest ``i``."""
    bound = (kl.amin(1, keepdim=True) * (1 + tolerance) + _KL_ABS_SLACK).nan_to_num_(posinf=-1.0)
    band = kl <= bound  # (a row without a finite divergence gets an empty band)
    row, col = band.nonzero(as_tuple=True)
    i = cand[col]
    err = mse_at(m, row, torch.minimum(i * m.width[row, 0], amax[row]), qmax)
    low = err.new_full((kl.shape[0],), torch.inf).scatter_reduce_(0, row, err, "amin")
    none = int(cand[-1]) + 1
    pick = i.new_full(low.shape, none).scatter_reduce_(0, row, torch.where(err == low[row], i, none), "amin")
    thr = torch.minimum(pick * m.width[:, 0], amax)
    return torch.where((last >= nq) & (pick < none), thr, amax)


def _guard(
    kl: torch.Tensor,
    cand: torch.Tensor,
    m: Moments,
    amax: torch.Tensor,
    last: torch.Tensor,
    qmax: int,
    thr: torch.Tensor,
    max_loss: float,
) -> torch.Tensor:
    """Keep the pick's estimated error within ``1 + max_loss`` of the best candidate's (see kl_threshold).

    Every candidate up to the row's last non-empty bin counts, also one of infinite divergence.
    """
    rows = torch.arange(kl.shape[0], device=kl.device)
    t = torch.minimum(cand[None, :].double() * m.width, amax[:, None])
    valid = cand[None, :] <= last[:, None]
    err = mse_at(m, rows[:, None], t, qmax).masked_fill_(~valid, torch.inf)
    bound = err.amin(1) * (1 + max_loss)
    worse = mse_at(m, rows, thr, qmax) > bound
    if not bool(worse.any()):
        return thr
    allowed = valid & (err <= bound[:, None])
    kl_in = kl.masked_fill(~allowed, torch.inf)
    tied = allowed & (kl_in <= kl_in.amin(1, keepdim=True))
    pick = err.masked_fill(~tied, torch.inf).argmin(1, keepdim=True)  # first = smallest i on equal error
    return torch.where(worse, t.gather(1, pick)[:, 0], thr)


def kl_divergences(counts: torch.Tensor, nq: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Return the divergence of every candidate of :func:`kl_threshold` (no coarsening, no tie-break).

    Args:
        counts: ``(rows, B + 1)`` histogram (column 0: exact zeros, left out).
        nq: number of quantized levels (``qmax + 1``).

    Returns:
        ``(cand, kl, last)``: candidate bin counts ``i`` (``(C,)``, None when no row has ``J >= nq``),
        divergences ``(rows, C)`` (``inf`` for candidates beyond a row's ``J``) and ``J`` per row.
    """
    h = counts[:, 1:].double()
    rows, bins = h.shape
    fused = search_kernels.kl_low(counts.double(), nq) if nq <= bins else None
    if fused is not None:  # prefix sums, J, and the candidates up to 2 nq when bins >= 2 nq
        cum, last, low = fused
    else:
        cum, low = h.new_empty(rows, bins + 1), None
        cum[:, 0] = 0
        torch.cumsum(h, 1, out=cum[:, 1:])
        last = (cum[:, :-1] < cum[:, -1:]).sum(1)  # J per row: bins up to the last non-empty one
    total = cum[:, -1:]
    if nq > bins or not bool((last >= nq).any()):
        return None, h.new_zeros(rows, 0), last
    top = int(last.max())
    cand = torch.arange(nq, top + 1, device=h.device)
    if low is not None:  # kl of i = nq .. 2 nq from the kernel, masked like below
        if top <= 2 * nq:
            return cand, low[:, : top - nq + 1], last
        high = _high_terms(h, nq, top).t()
        kl = _log(cum[:, 2 * nq + 1 : top + 1] / total).add_(high / total)
        kl.masked_fill_(cand[nq + 1 :] > last[:, None], torch.inf)
        return cand, torch.cat([low, kl], 1), last
    num = _low_terms(h, cum, nq)[:, : top - nq + 1]
    if top > 2 * nq:
        num = torch.cat([num, _high_terms(h, nq, top).t()], 1)
    kl = _log(cum[:, nq : top + 1] / total).add_(num / total)
    kl.masked_fill_(cand > last[:, None], torch.inf)  # also the NaN of empty rows
    return cand, kl, last


def _low_terms(h: torch.Tensor, cum: torch.Tensor, nq: int) -> torch.Tensor:
    """``N * KL - N log(sum_{j<i} h_j / N)`` for ``i = nq .. 2 nq`` by slices: ``(rows, nq + 1)``.

    For ``i < 2 nq`` (``m = 1``) the groups are ``r`` pairs from bin 0 and single bins (``D = 0``), the top
    one being bin ``i - 1``; ``i = 2 nq`` is ``nq`` pairs.
    """
    rows, bins = h.shape
    if bins < 2 * nq:  # only for qmax > bins / 2 - 1 (int8 histograms have at least 256 bins)
        h = torch.nn.functional.pad(h, (0, 2 * nq - bins))
        cum = torch.nn.functional.pad(cum, (0, 2 * nq - bins), mode="replicate")
    h = h[:, : 2 * nq]
    log_h = _log(h)
    a, b = h[:, 0::2], h[:, 1::2]
    s = a + b
    both = (a * b).sign_()  # s log(s / n) = s log s - s log 2 when both bins are non-empty
    d = (
        (a * log_h[:, 0::2])
        .addcmul_(b, log_h[:, 1::2])
        .addcmul_(s, _log(s), value=-1)
        .addcmul_(s, both, value=math.log(2))
    )
    pairs = torch.nn.functional.pad(d.cumsum(1), (1, 0))  # sum of the first r pairs
    total = cum[:, -1:]
    single = h[:, nq - 1 : 2 * nq - 1]  # top group of i = nq + r: bin i - 1
    p_last = (total - cum[:, nq : 2 * nq]).clamp_min_(0).add_(single)
    top = p_last * (_log(p_last) - log_h[:, nq - 1 : 2 * nq - 1])
    top.masked_fill_(single == 0, torch.inf)  # only clipped mass on top (or i > J: masked anyway)
    # i = 2 nq: the top group is the last pair, clipped mass in its second bin
    out = (total[:, 0] - cum[:, 2 * nq]).clamp_min(0)
    a, b = a[:, -1], b[:, -1]
    n = (a > 0).double() + ((b > 0) | (out > 0)).double()  # the last bin counts when it holds clipped mass
    pair = a * log_h[:, -2] + (b + out) * _log(b + out) - (s[:, -1] + out) * _log(s[:, -1] / n.clamp_min(1))
    pair = pair.masked_fill_((s[:, -1] == 0) & (out > 0), torch.inf)
    return torch.cat([pairs[:, :nq] + top, (pairs[:, nq - 1] + pair)[:, None]], 1)


def _high_terms(h: torch.Tensor, nq: int, top: int) -> torch.Tensor:
    """``N * KL - N log(sum_{j<i} h_j / N)`` for ``i = 2 nq + 1 .. top`` by chain sums: ``(C, rows)``."""
    rows, bins = h.shape
    # prefix sums of count, non-empty bins and h log h, bins along the slow axis: (3 * (bins + 1), rows)
    pre = h.new_zeros(3, bins + 1, rows)
    pre[:, 1:] = torch.stack([h, (h > 0).double(), h * _log(h)]).cumsum(2).transpose(1, 2)
    pre = pre.view(3 * (bins + 1), rows)
    cand = torch.arange(2 * nq + 1, top + 1, device=h.device)
    lay = _chain_layout(bins + 1, top, nq, h.device)
    return _group_sums(pre, lay) + _top_group(pre, cand, nq)


def _log(t: torch.Tensor) -> torch.Tensor:
    """Take the natural logarithm, with 0 mapped to the logarithm of 1e-300 (so that 0 * log 0 is 0)."""
    return torch.log(t.clamp_min(1e-300))


class _Chains(NamedTuple):
    """Index layout of the chain sums needed by one candidate range (see :func:`_chain_layout`)."""

    ends: torch.Tensor  # rows of the 3 prefix tables: end bins, then start bins, in chain order
    valid: torch.Tensor  # (P, 1) float: 1 where the group ends at or below the last bin
    seg_end: torch.Tensor  # position of the last element of the same chain
    idx: torch.Tensor  # (4 C,): positions of E_{m+1}[0], E_{m+1}[r (m + 1)], E_m[r (m + 1)], E_m[i - m]


@functools.lru_cache(maxsize=64)
def _chain_layout(cells: int, top: int, nq: int, device: torch.device) -> _Chains:
    """Lay out the groups of ``L >= 2`` bins that candidates ``2 nq + 1 .. top`` need, chain by chain.

    A chain is the sequence of starts ``a, a + L, a + 2 L, ...`` below ``cells``; in chain order a suffix
    sum inside each chain is one global cumulative sum. Candidate ``i = m nq + r`` (``m >= 2``) needs the
    chain of ``L = m + 1`` from 0 (its ``r`` larger groups) and the chain of ``L = m`` through
    ``r (m + 1)`` (its other groups).
    """
    chains = {(m + 1, 0) for m in range(2, top // nq + 1)}
    for m in range(2, top // nq + 1):
        chains.update((m, res) for res in range(min(m - 1, top - m * nq) + 1))
    pos = torch.full((top // nq + 2, cells), -1, dtype=torch.long)
    lo, size, seg_end, n = [], [], [], 0
    for length, res in sorted(chains):
        starts = torch.arange(res, cells, length)
        pos[length, starts] = torch.arange(n, n + starts.numel())
        n += starts.numel()
        lo.append(starts)
        size.append(torch.full_like(starts, length))
        seg_end.append(torch.full_like(starts, n - 1))
    lo_t = torch.cat(lo)
    hi = lo_t + torch.cat(size)
    cand = torch.arange(2 * nq + 1, top + 1)
    m, r = cand // nq, cand % nq
    first = r * (m + 1)
    idx = torch.stack([pos[m + 1, 0], pos[m + 1, first], pos[m, first], pos[m, cand - m]])
    ends = torch.cat([hi.clamp(max=cells - 1), lo_t])
    return _Chains(
        torch.cat([ends, ends + cells, ends + 2 * cells]).to(device),
        (hi <= cells - 1).double()[:, None].to(device),
        torch.cat(seg_end).to(device),
        idx.reshape(-1).to(device),
    )


def _select(pre: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``pre[idx]`` along dim 0 (a flat gather for a single row: several times faster)."""
    if pre.shape[1] == 1:
        return pre.view(-1).index_select(0, idx)[:, None]
    return pre.index_select(0, idx)


def _group_sums(pre: torch.Tensor, lay: _Chains) -> torch.Tensor:
    """``sum_g D_g`` over all groups but the top one, for every candidate ``i > 2 nq``: ``(C, rows)``."""
    sel = _select(pre, lay.ends).view(3, 2, -1, pre.shape[1])
    s, n, hlogh = (sel[:, 0] - sel[:, 1]).unbind(0)
    d = (hlogh - s * _log(s / n.clamp_min(1))) * lay.valid
    g = d.cumsum(0)
    e = _select(_select(g, lay.seg_end) - g + d, lay.idx)  # suffix sums inside chains
    e = e.view(4, -1, pre.shape[1])
    return e[0] - e[1] + e[2] - e[3]


def _top_group(pre: torch.Tensor, cand: torch.Tensor, nq: int) -> torch.Tensor:
    """Return the top group's term (bins ``i - m .. i - 1``, clipped mass in bin ``i - 1``): ``(C, rows)``.

    It is ``inf`` when the top group holds only clipped mass (``Q = 0 < P``).
    """
    cells = pre.shape[0] // 3
    idx = torch.cat([cand, cand - cand // nq, cand - 1])
    sel = _select(pre, torch.cat([idx, idx + cells, idx + 2 * cells])).view(3, 3, cand.numel(), -1)
    cum, cnz, hlogh = sel.unbind(0)
    inside = cum[0]
    s, n, h_log = cum[0] - cum[1], cnz[0] - cnz[1], hlogh[0] - hlogh[1]
    h_last = cum[0] - cum[2]
    out = (pre[cells - 1] - inside).clamp_min(0)
    clipped = out.sign()  # 1 where some mass is clipped
    n = n + (1 - (cnz[0] - cnz[2])) * clipped  # a last bin holding only clipped mass counts as non-empty
    p_last = h_last + out
    p_side = h_log - h_last * _log(h_last) + p_last * _log(p_last)
    q_side = (s + out) * _log(s / n.clamp_min(1))
    return (p_side - q_side).masked_fill_((s == 0) & (clipped > 0), torch.inf)
