"""quant/backends/_search_kernels.c: the fused search kernels against the ATen code of the searches."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qat_lightning.quant.backends import search_kernels
from qat_lightning.quant.nodes.functional import load_extension
from qat_lightning.quant.observers.histogram_error import (
    all_rows,
    edge_argmin,
    edge_mse,
    estimate_mse,
    moments,
    mse_at,
)
from qat_lightning.quant.observers.histogram_search import mix_candidates, mix_threshold, mse_threshold
from qat_lightning.quant.observers.kl_search import kl_divergences, kl_threshold

needs_kernels = pytest.mark.skipif(
    not search_kernels.search_kernels_available(), reason="search kernels not built"
)

QMAXES = (127, 32767)
# (rows, bins): per tensor at the observers' 2048 bins, per channel at the bins the searches use
SHAPES = ((1, 2048), (1, 256), (64, 1024), (256, 256))


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads={t}")
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _histograms(rows: int, bins: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts, width, amax)``: dense, heavy-tailed, sampled (fractional) and degenerate rows."""
    g = torch.Generator().manual_seed(seed)
    j = torch.arange(1, bins + 1, dtype=torch.float64)
    kinds = torch.arange(rows) % 7 if rows > 1 else torch.tensor([seed % 7])
    counts = torch.zeros(rows, bins + 1, dtype=torch.float64)
    for r, kind in enumerate(kinds.tolist()):
        scale = float(torch.randint(2, bins // 2, (1,), generator=g))
        if kind == 0:  # Gaussian-like, integer counts
            counts[r, 1:] = torch.poisson(400 * torch.exp(-((j / scale) ** 2)), generator=g)
        elif kind == 1:  # heavy tail (Student-t(3)-like) with isolated far bins
            counts[r, 1:] = torch.poisson(300 / (1 + (j / scale) ** 2) ** 2, generator=g)
            far = torch.randint(bins // 2, bins, (3,), generator=g)
            counts[r, 1 + far] = 1.0
        elif kind == 2:  # sampled batch: fractional weights, gaps
            weight = 1 + float(torch.rand((), generator=g)) * 3
            keep = torch.rand(bins, generator=g) > 0.3
            counts[r, 1:] = torch.poisson(50 * torch.exp(-j / scale), generator=g) * keep * weight
        elif kind == 3:  # a single non-empty bin
            counts[r, int(torch.randint(1, bins + 1, (1,), generator=g))] = 17.0
        elif kind == 4:  # exact zeros only
            counts[r, 0] = 12.0
        elif kind == 5:  # empty row (no data)
            pass
        else:  # ends early (ReLU-like spike at 0 plus a short range)
            counts[r, 0] = 500.0
            n = int(scale) // 4 + 1
            counts[r, 1 : 1 + n] = torch.poisson(torch.full((n,), 30.0), generator=g)
    nonzero = counts[:, 1:] > 0
    last = torch.where(nonzero.any(1), bins - nonzero.flip(1).int().argmax(1), 0)
    width = torch.where(
        nonzero.any(1), 2.0 ** torch.randint(-12, 4, (rows,), generator=g).double() / bins, 0.0
    )
    amax = torch.where(last > 0, (last - torch.rand(rows, generator=g, dtype=torch.float64)) * width, 0.0)
    return counts, width, amax


def _both(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - any search function and its result
    fused = fn(*args, **kwargs)
    with search_kernels.disabled():
        ref = fn(*args, **kwargs)
    return fused, ref


def _cases():
    return [(rows, bins, seed) for rows, bins in SHAPES for seed in (0, 1, 2)]


@needs_kernels
@pytest.mark.parametrize("rows,bins,seed", _cases())
def test_moments_bit_identical(rows: int, bins: int, seed: int, threads: int) -> None:
    counts, width, _ = _histograms(rows, bins, seed)
    fused, ref = _both(moments, counts, width)
    assert torch.equal(fused.width, ref.width)
    assert torch.equal(fused.pre, ref.pre)
    assert torch.equal(fused.totals, ref.totals)


@needs_kernels
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("rows,bins,seed", _cases())
def test_edge_mse_and_mse_at_bit_identical(rows: int, bins: int, seed: int, qmax: int, threads: int) -> None:
    counts, width, amax = _histograms(rows, bins, seed)
    m = moments(counts, width)
    for first, last in ((1, bins), (3, bins // 2), (bins, bins)):
        fused, ref = _both(edge_mse, m, first, last, qmax)
        assert fused.shape == (rows, last - first + 1)
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=0)
        assert torch.equal(fused, ref)
        fused, ref = _both(edge_argmin, m, first, last, qmax)
        assert torch.equal(fused, ref) and torch.equal(fused, edge_mse(m, first, last, qmax).argmin(1))
    g = torch.Generator().manual_seed(seed)
    # every row: thresholds below 0, at 0, inside, at amax and beyond the range
    span = (width * bins)[:, None]
    inside = torch.rand(rows, 20, generator=g, dtype=torch.float64) * span * 1.2
    t = torch.cat([inside, -span, 0 * span, amax[:, None]], 1)
    fused, ref = _both(mse_at, m, all_rows(m), t, qmax)
    assert torch.equal(fused, ref)
    # one row index per threshold
    row = torch.randint(0, rows, (50,), generator=g)
    t1 = torch.rand(50, generator=g, dtype=torch.float64) * span[row, 0]
    fused, ref = _both(mse_at, m, row, t1, qmax)
    assert torch.equal(fused, ref)


def _same_or_equal_error(fused: torch.Tensor, ref: torch.Tensor, counts, width, qmax: int) -> None:  # noqa: ANN001
    """Thresholds equal; where they differ (a near-tie of the argmin) their estimated errors are equal."""
    diff = fused != ref
    if bool(diff.any()):
        with search_kernels.disabled():
            err = estimate_mse(counts, width, torch.stack([fused, ref], 1), qmax)
        torch.testing.assert_close(err[diff, 0], err[diff, 1], rtol=1e-12, atol=0)


@needs_kernels
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("rows,bins,seed", _cases())
def test_kl_divergences_and_thresholds(rows: int, bins: int, seed: int, qmax: int, threads: int) -> None:
    counts, width, amax = _histograms(rows, bins, seed)
    (cand, kl, last), (cand_r, kl_r, last_r) = _both(kl_divergences, counts, qmax + 1)
    assert torch.equal(last, last_r)
    assert (cand is None) == (cand_r is None)
    if cand is not None:
        assert torch.equal(cand, cand_r)
        assert torch.equal(torch.isinf(kl), torch.isinf(kl_r))
        finite = torch.isfinite(kl_r)
        torch.testing.assert_close(kl[finite], kl_r[finite], rtol=1e-12, atol=1e-15)
        assert torch.equal(kl, kl_r)  # the same operations, and ATen's own log
    fused, ref = _both(kl_threshold, counts, width, amax, qmax)
    _same_or_equal_error(fused, ref, counts, width, qmax)
    for tolerance in (0.0, 0.5):
        fused, ref = _both(kl_threshold, counts, width, amax, qmax, tolerance)
        _same_or_equal_error(fused, ref, counts, width, qmax)


@needs_kernels
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("rows,bins,seed", _cases())
def test_mse_and_mix_thresholds_match(rows: int, bins: int, seed: int, qmax: int, threads: int) -> None:
    counts, width, amax = _histograms(rows, bins, seed)
    fused, ref = _both(mse_threshold, counts, width, amax, qmax)
    _same_or_equal_error(fused, ref, counts, width, qmax)
    (thr, win), (thr_r, win_r) = _both(mix_threshold, counts, width, amax, qmax)
    _same_or_equal_error(thr, thr_r, counts, width, qmax)
    assert torch.equal(win[thr == thr_r], win_r[thr == thr_r])
    fused, ref = _both(mix_candidates, counts, width, amax, qmax)
    for col in range(fused.shape[1]):
        _same_or_equal_error(fused[:, col], ref[:, col], counts, width, qmax)


@needs_kernels
def test_kl_beyond_two_levels_and_short_histograms() -> None:
    """Candidates above 2 nq (kernel, then ATen chain sums) and bins < 2 nq (ATen on the kernel's sums)."""
    counts, width, amax = _histograms(1, 4096, 0)  # kind 0: Gaussian over a wide range
    counts[0, 1:3001] += 1.0  # non-empty far beyond 2 nq = 256 bins
    (cand, kl, last), (cand_r, kl_r, last_r) = _both(kl_divergences, counts, 128)
    assert int(last) == 3000 and torch.equal(cand, cand_r)
    torch.testing.assert_close(kl, kl_r, rtol=1e-12, atol=1e-15)
    short = torch.zeros(1, 32769, dtype=torch.float64)
    short[0, 1:] = torch.poisson(torch.full((32768,), 3.0), generator=torch.Generator().manual_seed(0))
    (cand, kl, last), (cand_r, kl_r, last_r) = _both(kl_divergences, short, 32768)
    assert torch.equal(last, last_r) and torch.equal(cand, cand_r)
    torch.testing.assert_close(kl, kl_r, rtol=1e-12, atol=1e-15)


def test_kernels_switch_off_with_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAT_LIGHTNING_NO_KERNELS", "1")
    assert load_extension("_search_kernels") is None and load_extension("_kernels") is None
    monkeypatch.setenv("QAT_LIGHTNING_NO_KERNELS", "0")
    built = importlib.util.find_spec("qat_lightning.quant.backends._search_kernels") is not None
    assert (load_extension("_search_kernels") is not None) == built
    with search_kernels.disabled():
        assert not search_kernels.search_kernels_available()
        counts, width, _ = _histograms(4, 256, 0)
        assert search_kernels.moments(counts, width) is None


@needs_kernels
def test_kernels_skip_what_they_do_not_handle() -> None:
    counts, width, _ = _histograms(4, 256, 0)
    assert search_kernels.moments(counts.float(), width) is None
    assert search_kernels.moments(counts.t().contiguous().t(), width) is None
    m = moments(counts, width)
    assert search_kernels.edge_mse(m.pre, m.counts, m.width, 0, 10, 127) is None  # column 0 is no edge
    assert search_kernels.edge_mse(m.pre, m.counts, m.width, 1, 257, 127) is None
