"""Tests of the threshold searches (histogram_error, histogram_search, kl_search) against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.ao.quantization import HistogramObserver

from qat_lightning.quant.dtypes import qint8, qint16
from qat_lightning.quant.observers import make_observer
from qat_lightning.quant.observers.histogram import AbsHistogram
from qat_lightning.quant.observers.histogram_error import (
    all_rows,
    coarsen,
    edge_mse,
    estimate_mse,
    moments,
    mse_at,
)
from qat_lightning.quant.observers.histogram_search import (
    MIX_CANDIDATES,
    mix_candidates,
    mix_threshold,
    mse_threshold,
)
from qat_lightning.quant.observers.kl_search import KL_TOLERANCE, kl_divergences, kl_threshold


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_counts(rows: int, bins: int, seed: int) -> torch.Tensor:
    """Sparse-ish histograms with gaps, empty tails and a few rows that end early."""
    g = _gen(seed)
    decay = torch.exp(-torch.linspace(0, 6, bins))[None, :] * (1 + 50 * torch.rand(rows, 1, generator=g))
    counts = torch.poisson(decay * 40, generator=g)
    counts *= torch.rand(rows, bins, generator=g) > 0.15  # empty bins inside the range
    ends = torch.randint(bins // 4, bins + 1, (rows,), generator=g)
    counts *= torch.arange(bins)[None, :] < ends[:, None]
    zeros = torch.randint(0, 30, (rows, 1), generator=g).double()
    return torch.cat([zeros, counts.double()], 1)


def _reference_kl(h: np.ndarray, nq: int) -> dict[int, float]:
    """The documented divergence of every candidate ``i`` (float64, one loop per candidate)."""
    nonempty = np.nonzero(h)[0]
    last = int(nonempty[-1]) + 1 if len(nonempty) else 0
    out = {}
    for i in range(nq, last + 1):
        m, r = divmod(i, nq)
        bounds = np.cumsum([0] + [m + 1] * r + [m] * (nq - r))
        clipped = h[i:].sum()
        p, q = h[:i].copy(), np.zeros(i)
        for g in range(nq):
            seg = slice(bounds[g], bounds[g + 1])
            nonzero = h[seg] > 0
            if g == nq - 1 and clipped > 0:
                nonzero[-1] = True  # a last bin holding only clipped mass counts as non-empty
            q[seg] = np.where(nonzero, h[seg].sum() / max(nonzero.sum(), 1), 0.0)
        p[-1] += clipped
        p, q = p / p.sum(), q / q.sum()
        on = p > 0
        out[i] = math.inf if np.any(q[on] == 0) else float(np.sum(p[on] * np.log(p[on] / q[on])))
    return out


@pytest.mark.parametrize(("bins", "nq"), [(40, 16), (100, 8), (64, 32), (200, 12)])
def test_kl_divergences_match_float64_reference(bins: int, nq: int) -> None:
    counts = _random_counts(6, bins, seed=bins + nq)
    counts[1, 1 + bins // 3] = 0.0  # and a row whose top bins may be empty before clipped mass
    cand, kl, last = kl_divergences(counts, nq)
    assert cand is not None
    for row in range(counts.shape[0]):
        ref = _reference_kl(counts[row, 1:].numpy(), nq)
        assert int(last[row]) == (max(ref) if ref else int(last[row]))
        for col, i in enumerate(cand.tolist()):
            got = float(kl[row, col])
            want = ref.get(i, math.inf)  # candidates past the row's last non-empty bin are inf
            if math.isinf(want):
                assert math.isinf(got), (row, i)
            else:
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (row, i)


def test_kl_threshold_tie_break_and_cap() -> None:
    counts = _random_counts(5, 120, seed=3)
    width = torch.rand(5, generator=_gen(4), dtype=torch.float64) + 0.1
    amax = width * 119.5  # the last edges lie above amax: capped
    qmax = 9
    for tol in (0.0, KL_TOLERANCE, 0.3):
        got = kl_threshold(counts, width, amax, qmax, tolerance=tol, max_mse_loss=math.inf)
        cand, kl, last = kl_divergences(counts, qmax + 1)
        for row in range(5):
            finite = torch.isfinite(kl[row])
            if not finite.any():
                assert float(got[row]) == float(amax[row])
                continue
            band = finite & (kl[row] <= kl[row][finite].min() * (1 + tol) + 1e-12)
            thr = torch.minimum(cand[band].double() * width[row], amax[row])
            err = estimate_mse(counts[row : row + 1], width[row : row + 1], thr[None, :], qmax)[0]
            assert float(got[row]) == pytest.approx(float(thr[int(err.argmin())]), rel=1e-12)
            if tol == 0.0:
                assert float(got[row]) == pytest.approx(float(thr[0]), rel=1e-12)  # plain minimum


def test_kl_int16_and_short_rows_return_amax() -> None:
    counts = _random_counts(3, 300, seed=5)
    width = torch.full((3,), 0.01, dtype=torch.float64)
    amax = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(kl_threshold(counts, width, amax, qint16.qmax), amax)
    counts[:, 100:] = 0  # no row reaches nq = 128 bins
    assert torch.equal(kl_threshold(counts, width, amax, qint8.qmax), amax)


def test_edge_mse_equals_mse_at() -> None:
    m = moments(*coarsen(_random_counts(7, 512, seed=6), torch.linspace(0.01, 1, 7, dtype=torch.float64)))
    for qmax in (127, 32767, 5):
        i = torch.arange(2, 500, dtype=torch.float64)
        want = mse_at(m, all_rows(m), m.width * i, qmax)
        atol = 1e-9 * float(want.abs().max())  # float64 cancellation in the clipping term
        torch.testing.assert_close(edge_mse(m, 2, 499, qmax), want, rtol=1e-9, atol=atol)


def test_estimate_mse_matches_direct_float64() -> None:
    """Values spread uniformly inside their bins: the histogram estimate is the exact expectation."""
    g = _gen(7)
    bins, width = 256, 0.05
    idx = torch.randint(1, bins + 1, (20_000,), generator=g)
    x = ((idx - 1).double() + torch.rand(20_000, generator=g, dtype=torch.float64)) * width
    x[:500] = 0.0
    counts = torch.bincount(torch.where(x > 0, idx, 0), minlength=bins + 1).double()[None, :]
    thr = torch.tensor([[0.9, 3.3, 7.0, 12.8]], dtype=torch.float64)
    est = estimate_mse(counts, torch.tensor([width], dtype=torch.float64), thr, 127)[0]
    for t, e in zip(thr[0].tolist(), est.tolist(), strict=True):
        s = t / 127
        q = torch.clamp(torch.round(x / s), 0, 127) * s
        direct = float(((x - q) ** 2).mean())
        assert e == pytest.approx(direct, rel=0.03)  # sampling noise of the rounding error only


@pytest.mark.parametrize("qmax", [127, 32767])
def test_mse_threshold_beats_dense_float64_grid(qmax: int) -> None:
    counts = _random_counts(4, 2048, seed=8)
    width = torch.tensor([0.001, 0.01, 0.1, 1.0], dtype=torch.float64)
    amax = (counts[:, 1:] > 0).double().mul(torch.arange(1, 2049)).amax(1) * width - width / 3
    got = mse_threshold(counts, width, amax, qmax)
    grid = amax[:, None] * torch.linspace(1e-3, 1, 20_000, dtype=torch.float64)
    dense = estimate_mse(counts, width, grid, qmax).amin(1)
    mine = estimate_mse(counts, width, got[:, None], qmax)[:, 0]
    assert bool((got <= amax).all()) and bool((got > 0).all())
    assert bool((mine <= dense * (1 + 1e-6)).all())


@pytest.mark.parametrize("method", ["kl", "mse", "mix"])
def test_per_channel_search_equals_row_by_row(method: str) -> None:
    """Searching 300 channels at once gives each channel's own search on its coarsened histogram."""
    x = torch.randn(300, 2000, generator=_gen(9)) * torch.logspace(-2, 2, 300)[:, None]
    x[::7] = torch.relu(x[::7])
    obs = make_observer(method, ch_axis=0, num_channels=300)
    obs(x)
    hist = obs.histogram
    counts, width = coarsen(hist.counts, hist.width)
    assert counts.shape[1] - 1 == 256  # 2048 bins merged by 8: 300 * 256 <= 2**16
    amax = obs.observed_amax()
    search = {"kl": kl_threshold, "mse": mse_threshold, "mix": lambda *a: mix_threshold(*a)[0]}[method]
    batched = search(hist.counts, hist.width, amax, 127)
    for row in range(0, 300, 13):
        single = search(counts[row : row + 1], width[row : row + 1], amax[row : row + 1], 127)
        assert float(batched[row]) == float(single[0]), row
    scale = obs.compute_scale(qint8)
    torch.testing.assert_close(scale, (batched / 127).float().clamp_min(2.0**-24))


def test_mix_never_needs_kl() -> None:
    """kl's threshold (a bin edge, or amax) never scores below mse's or minmax's (see mix_threshold)."""
    for seed in range(4):
        counts = _random_counts(20, 1024, seed=10 + seed)
        width = torch.rand(20, generator=_gen(seed), dtype=torch.float64) + 0.01
        amax = (counts[:, 1:] > 0).double().mul(torch.arange(1, 1025)).amax(1) * width
        cands = mix_candidates(counts, width, amax, 127)
        err = estimate_mse(counts, width, cands, 127)
        kl_err = err[:, MIX_CANDIDATES.index("kl")]
        others = err[:, [MIX_CANDIDATES.index("mse"), MIX_CANDIDATES.index("minmax")]].amin(1)
        assert bool((kl_err >= others * (1 - 1e-12)).all())
        thr, win = mix_threshold(counts, width, amax, 127)
        assert bool((err.gather(1, win[:, None])[:, 0] <= err.amin(1) * (1 + 1e-12)).all())
        torch.testing.assert_close(thr, cands.gather(1, win[:, None])[:, 0], rtol=0, atol=0)


def _sqnr(x: torch.Tensor, scale: float) -> float:
    q = torch.clamp(torch.round(x / scale), -128, 127) * scale
    return float(10 * torch.log10(x.pow(2).mean() / (x - q).pow(2).mean()))


def _student_t3(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    n = torch.randn(shape, generator=g)
    return n / (torch.randn((3, *shape), generator=g).pow(2).sum(0) / 3).sqrt()


@pytest.mark.parametrize(
    ("data", "shape", "batches"),
    [
        # the configuration of benchmarks/observers.py (its published Student-t(3) figure)
        ("student_t3", (16, 64, 32, 32), 8),
        ("relu_gauss", (4, 64, 32, 32), 4),
        ("relu_gauss", (16, 4096), 4),
    ],
)
def test_kl_sqnr_within_0p2_db_of_torch_ao_histogram(data: str, shape: tuple[int, ...], batches: int) -> None:
    g = _gen(1)
    make = _student_t3 if data == "student_t3" else lambda s, g: torch.relu(torch.randn(s, generator=g))
    ao = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    kl = make_observer("kl")
    for _ in range(batches):
        x = make(shape, g)
        ao(x)
        kl(x)
    held = make(shape, g)
    assert _sqnr(held, float(kl.compute_scale(qint8))) >= _sqnr(held, float(ao.calculate_qparams()[0])) - 0.2


def test_histogram_modules_reexport_the_searches() -> None:
    from qat_lightning.quant.observers import histogram

    names = ("coarsen", "estimate_mse", "kl_threshold", "mse_threshold", "mix_threshold", "MIX_CANDIDATES")
    for name in names:
        assert hasattr(histogram, name), name
    assert AbsHistogram is histogram.AbsHistogram
