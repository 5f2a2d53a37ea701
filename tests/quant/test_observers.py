"""Tests of qat_lightning.quant.observers / histogram (CPU, fast)."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization import (
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from torch.ao.quantization import MinMaxObserver as AoMinMaxObserver

from qat_lightning.quant.dtypes import qint8, qint16
from qat_lightning.quant.observers import (
    DEFAULT_SCALE,
    OBSERVER_NAMES,
    SCALE_EPS,
    FixedScaleObserver,
    KLObserver,
    MinMaxObserver,
    MixObserver,
    MovingMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from qat_lightning.quant.observers.histogram import (
    MIX_CANDIDATES,
    AbsHistogram,
    estimate_mse,
    mix_candidates,
)

HIST_METHODS = ("percentile", "kl", "mse", "mix")
DATA_METHODS = ("minmax", "moving_minmax", *HIST_METHODS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _laplace(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    e = torch.empty((2, *shape)).exponential_(generator=_gen(seed))
    return e[0] - e[1]


def _student_t3(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _gen(seed)
    n = torch.randn(shape, generator=g)
    chi2 = torch.randn((3, *shape), generator=g).pow(2).sum(0)
    return n / (chi2 / 3).sqrt()


def _relu_gauss(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.relu(torch.randn(shape, generator=_gen(seed)))


def _make(method: str, **kw: object) -> Observer:
    if method == "fixed":
        kw.setdefault("threshold", 3.0)
    return make_observer(method, **kw)


def _fq(x: torch.Tensor, scale: float | torch.Tensor, dtype=qint8) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), dtype.qmin, dtype.qmax) * scale


def _sqnr(x: torch.Tensor, scale: float, dtype=qint8) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - _fq(x, scale, dtype)).pow(2).mean()))


# ------------------------------------------------------------------------------------------------ API


def test_public_constants() -> None:
    assert OBSERVER_NAMES == ("minmax", "moving_minmax", "percentile", "kl", "mse", "mix", "fixed")
    assert 0 < SCALE_EPS < 1e-6
    assert DEFAULT_SCALE == 1.0
    expected = {
        "minmax": MinMaxObserver,
        "moving_minmax": MovingMinMaxObserver,
        "percentile": PercentileObserver,
        "kl": KLObserver,
        "mse": MSEObserver,
        "mix": MixObserver,
        "fixed": FixedScaleObserver,
    }
    for name, cls in expected.items():
        obs = _make(name, name_for_messages="layer1.conv")
        assert type(obs) is cls and isinstance(obs, Observer)
        assert obs.name == "layer1.conv" and obs.ch_axis is None and obs.num_channels is None
        assert cls.__mro__[1] is Observer  # one abstract base, no deeper towers


def test_update_range_is_range_only() -> None:
    x = torch.randn(4, 8, generator=_gen(0)) * 3
    obs = make_observer("mse")
    amax, finite = obs.update_range(x)
    assert amax.shape == () and float(amax) == pytest.approx(float(x.abs().max())) and bool(finite)
    assert obs.has_data and float(obs.histogram.counts.sum()) == 0
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max())
    # no histogram yet: every method falls back to the observed range
    assert float(obs.compute_scale(qint8)) == pytest.approx(float(x.abs().max()) / 127)
    pc = make_observer("minmax", ch_axis=0, num_channels=4)
    assert torch.allclose(pc.update_range(x)[0], x.abs().amax(1))


def test_update_range_row_factor_is_the_range_of_the_product_exactly() -> None:
    x = torch.randn(6, 50, generator=_gen(1)) * 3
    x[2, 7] = math.nan  # a non-finite row stays skipped with a factor too
    f = torch.tensor([0.7, -1.3, 2.0, 1e-3, -5.0, 1.0])
    got, ref = (
        make_observer("minmax", ch_axis=0, num_channels=6),
        make_observer("minmax", ch_axis=0, num_channels=6),
    )
    amax_g, finite_g = got.update_range(x, f)
    amax_r, finite_r = ref.update_range(x * f[:, None])
    assert torch.equal(amax_g, amax_r) and torch.equal(finite_g, finite_r) and not bool(finite_g[2])
    assert torch.equal(got.min_val, ref.min_val) and torch.equal(got.max_val, ref.max_val)
    assert torch.equal(got.nonfinite_batches, ref.nonfinite_batches)


# ------------------------------------------------------------------------------ torch.ao references


def test_minmax_matches_torch_ao() -> None:
    ours, ref = MinMaxObserver(), AoMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    for seed in range(3):
        x = torch.randn(8, 16, 5, 5, generator=_gen(seed)) * (seed + 1) + 0.3
        ours(x)
        ref(x)
    assert float(ours.min_val) == float(ref.min_val) and float(ours.max_val) == float(ref.max_val)
    # torch.ao symmetric: amax / ((qmax - qmin) / 2) = amax / 127.5; ours: amax / 127
    ao_scale = float(ref.calculate_qparams()[0])
    assert float(ours.compute_scale(qint8)) * 127 == pytest.approx(ao_scale * 127.5, rel=1e-6)


@pytest.mark.parametrize("ch_axis", [0, 1])
def test_per_channel_minmax_matches_torch_ao(ch_axis: int) -> None:
    c = 6 if ch_axis == 0 else 5
    shape = (6, 5, 3, 3)
    ours = MinMaxObserver(ch_axis=ch_axis, num_channels=c)
    ref = PerChannelMinMaxObserver(ch_axis=ch_axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    for seed in range(3):
        x = torch.randn(shape, generator=_gen(seed))
        ours(x)
        ref(x)
    assert torch.equal(ours.min_val, ref.min_val) and torch.equal(ours.max_val, ref.max_val)
    scale = ours.compute_scale(qint8)
    assert scale.shape == (c,)
    torch.testing.assert_close(scale * 127, ref.calculate_qparams()[0].float() * 127.5, rtol=1e-6, atol=0)


def test_moving_minmax_matches_torch_ao() -> None:
    ours = MovingMinMaxObserver(averaging_constant=0.1)
    ref = MovingAverageMinMaxObserver(
        averaging_constant=0.1, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric
    )
    pc_ours = MovingMinMaxObserver(ch_axis=0, num_channels=4, averaging_constant=0.1)
    pc_ref = MovingAveragePerChannelMinMaxObserver(
        averaging_constant=0.1, ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    xs = [torch.randn(4, 50, generator=_gen(s)) * (1 + s) for s in range(5)]
    for x in xs:
        ours(x)
        ref(x)
        pc_ours(x)
        pc_ref(x)
    torch.testing.assert_close(ours.avg_min, ref.min_val)
    torch.testing.assert_close(ours.avg_max, ref.max_val)
    torch.testing.assert_close(pc_ours.avg_min, pc_ref.min_val)
    torch.testing.assert_close(pc_ours.avg_max, pc_ref.max_val)
    ao_scale = float(ref.calculate_qparams()[0])
    assert float(ours.compute_scale(qint8)) * 127 == pytest.approx(ao_scale * 127.5, rel=1e-5)
    # running extremes are still exact
    assert float(ours.max_val) == max(float(x.max()) for x in xs)


# ------------------------------------------------------------------------------- histogram methods


@pytest.mark.parametrize("q", [50.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_numpy(q: float) -> None:
    x = _laplace((30_000,), 1)  # below the sampling cap (2**15): every element is binned
    obs = PercentileObserver(percentile=q)
    obs(x)
    thr = float(obs.compute_scale(qint8)) * 127
    assert abs(thr - _np_percentile(x, q)) <= _tolerance(x, q, float(obs.histogram.width[0]))


def _np_percentile(x: torch.Tensor, q: float) -> float:
    return float(np.percentile(x.abs().numpy(), q))


def _tolerance(x: torch.Tensor, q: float, width: float) -> float:
    """One bin width, plus the gap between the order statistics around the percentile (sparse tails)."""
    a = np.sort(x.abs().numpy().reshape(-1))
    k = (len(a) - 1) * q / 100
    gap = a[min(math.ceil(k) + 1, len(a) - 1)] - a[max(math.floor(k) - 1, 0)]
    return width + float(gap) + 1e-6


def test_percentile_per_channel_matches_numpy() -> None:
    x = _laplace((3, 20, 50), 2) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    obs = PercentileObserver(ch_axis=0, num_channels=3, percentile=99.0)
    obs(x)
    thr = obs.compute_scale(qint8) * 127
    for c in range(3):
        tol = _tolerance(x[c], 99.0, float(obs.histogram.width[c]))
        assert abs(float(thr[c]) - _np_percentile(x[c], 99.0)) <= tol


def _brute_force_mse(x: torch.Tensor, dtype=qint8, points: int = 1000) -> tuple[float, float]:
    xd = x.double().reshape(-1)
    amax = float(xd.abs().max())
    best = (math.inf, amax)
    for chunk in torch.linspace(amax / points, amax, points, dtype=torch.float64).split(100):
        s = chunk[:, None] / dtype.qmax
        err = ((torch.clamp(torch.round(xd / s), dtype.qmin, dtype.qmax) * s - xd) ** 2).mean(1)
        i = int(err.argmin())
        if float(err[i]) < best[0]:
            best = (float(err[i]), float(chunk[i]))
    return best[1] / dtype.qmax, best[0]


@pytest.mark.parametrize("data", ["laplace", "gauss", "relu"])
def test_mse_matches_brute_force(data: str) -> None:
    x = {
        "laplace": _laplace((20_000,), 3),
        "gauss": torch.randn(20_000, generator=_gen(3)),
        "relu": _relu_gauss((20_000,), 3),
    }[data]
    obs = MSEObserver()
    obs(x)
    scale = float(obs.compute_scale(qint8))
    ref_scale, ref_err = _brute_force_mse(x)
    err = float(((_fq(x.double(), scale) - x.double()) ** 2).mean())
    assert scale == pytest.approx(ref_scale, rel=0.05)
    assert err <= ref_err * 1.02


@pytest.mark.parametrize("data", ["laplace", "relu"])
def test_kl_and_mse_sqnr_close_to_torch_ao_histogram(data: str) -> None:
    make = _laplace if data == "laplace" else _relu_gauss
    calib = [make((8, 16, 32, 32), s) for s in range(3)]
    held = make((8, 16, 32, 32), 10)
    ao = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    kl, mse = KLObserver(), MSEObserver()
    for x in calib:
        ao(x)
        kl(x)
        mse(x)
    ref = _sqnr(held, float(ao.calculate_qparams()[0]))
    assert _sqnr(held, float(mse.compute_scale(qint8))) >= ref - 0.2
    assert _sqnr(held, float(kl.compute_scale(qint8))) >= ref - 0.2


def test_mix_picks_lowest_estimated_error() -> None:
    for data in (_student_t3((20_000,), 4), _relu_gauss((20_000,), 4)):
        obs = MixObserver()
        obs(data)
        for dtype in (qint8, qint16):
            scale = obs.compute_scale(dtype)
            hist = obs.histogram
            amax = obs.observed_amax()
            cands = mix_candidates(hist.counts, hist.width, amax, dtype.qmax)
            err = estimate_mse(hist.counts, hist.width, cands, dtype.qmax)[0]
            chosen = MIX_CANDIDATES.index(obs.last_choice)
            assert obs.last_choice != "kl"  # never better than mse / minmax (see mix_threshold)
            assert float(err[chosen]) <= float(err.min()) * (1 + 1e-12)
            assert float(scale) == pytest.approx(float(cands[0, chosen]) / dtype.qmax, rel=1e-6)
            # and each candidate matches the standalone observer on the same statistics
            for name in ("percentile", "kl", "mse"):
                single = make_observer(name)
                single.load_state_dict(obs.state_dict())
                i = MIX_CANDIDATES.index(name)
                assert float(single.compute_scale(dtype)) == pytest.approx(float(cands[0, i]) / dtype.qmax)
    pc = MixObserver(ch_axis=0, num_channels=3)
    pc(torch.randn(3, 500, generator=_gen(5)))
    assert pc.compute_scale(qint8).shape == (3,)
    assert len(pc.last_choices) == 3 and pc.last_choice in MIX_CANDIDATES


def test_int8_and_int16_from_one_pass() -> None:
    x = _laplace((8, 16, 32, 32), 6)
    for method in DATA_METHODS:
        obs = make_observer(method)
        obs(x)
        s8, s16 = obs.compute_scale(qint8), obs.compute_scale(qint16)
        assert float(s16) < float(s8), method
        thr8, thr16 = float(s8) * 127, float(s16) * 32767
        if method in ("kl", "mse", "mix"):
            assert thr16 >= thr8 - 1e-6, method  # finer levels: clip less
    # int16 mse/kl stay near the max (rounding error is tiny), and never worse than minmax
    mse, mm = make_observer("mse"), make_observer("minmax")
    mse(x)
    mm(x)
    err = float(((_fq(x, mse.compute_scale(qint16), qint16) - x) ** 2).mean())
    err_mm = float(((_fq(x, mm.compute_scale(qint16), qint16) - x) ** 2).mean())
    assert err <= err_mm * 1.05


def test_subsampled_batch_keeps_exact_tail() -> None:
    x = _student_t3((16, 64, 32, 32), 7)  # 1M elements: binned from a subsample + block maxima
    obs = PercentileObserver(percentile=99.99)
    obs(x)
    thr = float(obs.compute_scale(qint8)) * 127
    ref = float(np.percentile(x.abs().numpy(), 99.99))
    assert thr == pytest.approx(ref, rel=0.05)
    assert float(obs.histogram.total()[0]) == pytest.approx(x.numel(), rel=0.02)
    mse, mm = MSEObserver(), MinMaxObserver()
    mse(x)
    mm(x)
    err = float(((_fq(x, mse.compute_scale(qint16), qint16) - x) ** 2).mean())
    err_mm = float(((_fq(x, mm.compute_scale(qint16), qint16) - x) ** 2).mean())
    assert err <= err_mm * 1.05


def test_non_contiguous_large_input() -> None:
    x = _laplace((512, 256), 14)
    for method in DATA_METHODS:
        a, b = make_observer(method), make_observer(method)
        a(x)
        b(x.t())  # non-contiguous, above the sampling cap
        assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
        assert float(b.compute_scale(qint8)) == pytest.approx(float(a.compute_scale(qint8)), rel=0.05)


def test_histogram_growth_equals_single_pass() -> None:
    a = torch.randn(3000, generator=_gen(8))
    b = torch.randn(3000, generator=_gen(9)) * 100
    grown, once = PercentileObserver(percentile=99.0), PercentileObserver(percentile=99.0)
    grown(a)
    grown(b)
    once(torch.cat([a, b]))
    assert torch.equal(grown.histogram.hist_range, once.histogram.hist_range)
    torch.testing.assert_close(grown.histogram.counts, once.histogram.counts)
    both = torch.cat([a, b])
    tol = _tolerance(both, 99.0, float(grown.histogram.width[0]))
    assert abs(float(grown.compute_scale(qint8)) * 127 - _np_percentile(both, 99.0)) <= tol


def test_rebin_is_exact() -> None:
    hist = AbsHistogram(2, bins=256, max_samples=None)
    x = torch.tensor([[0.0, 0.1, 0.5, 1.0], [0.0, 0.0, 0.3, 0.25]])
    hist.observe(x, x.abs().amax(1), 0)
    hist.rebin(hist.hist_range * torch.tensor([4.0, 1.0], dtype=torch.float64))
    direct = AbsHistogram(2, bins=256, max_samples=None)
    direct.hist_range.copy_(hist.hist_range)
    direct.observe(x, x.abs().amax(1), 0)
    assert torch.equal(hist.counts, direct.counts)
    assert float(hist.counts[0, 0]) == 1 and float(hist.counts[1, 0]) == 2  # exact zeros


@pytest.mark.parametrize(
    "method,rows,bins",
    [
        ("kl", 1, 2048),
        ("mse", 32, 2048),
        ("mix", 64, 1024),
        ("kl", 100, 512),
        ("mse", 256, 256),
        ("mix", 1024, 256),
        ("percentile", 256, 2048),
        ("percentile", 1, 2048),
    ],
)
def test_default_bins_follow_the_search(method: str, rows: int, bins: int) -> None:
    """kl / mse / mix per channel: the bins their search uses (fixed at construction); percentile: 2048."""
    kwargs = {} if rows == 1 else {"ch_axis": 0, "num_channels": rows}
    obs = make_observer(method, **kwargs)
    assert obs.histogram.counts.shape == (rows, bins + 1) and obs.histogram.bins == bins
    obs(torch.randn(rows, 40, generator=_gen(1)) * 100)  # growing the range keeps the shapes
    state = obs.state_dict()
    assert state["histogram.counts"].shape == (rows, bins + 1)
    fresh = make_observer(method, **kwargs)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.compute_scale(qint8), obs.compute_scale(qint8))
    explicit = make_observer(method, **kwargs, bins=512)
    assert explicit.histogram.counts.shape == (rows, 513)


@pytest.mark.parametrize("method", ("kl", "mse", "mix"))
@pytest.mark.parametrize("data", ("gauss", "laplace"))
def test_default_bins_give_the_scales_of_2048_bins(method: str, data: str) -> None:
    w = torch.randn(256, 64, 3, 3, generator=_gen(2)) if data == "gauss" else _laplace((256, 64, 9), 3)
    auto = make_observer(method, ch_axis=0, num_channels=256)
    full = make_observer(method, ch_axis=0, num_channels=256, bins=2048)
    assert auto.histogram.bins == 256 and full.histogram.counts.shape == (256, 2049)
    for batch in (w, w * 3, w[:, :10] * 0.5):
        auto(batch)
        full(batch)
    for dtype in (qint8, qint16):
        assert torch.equal(auto.compute_scale(dtype), full.compute_scale(dtype))
    if method == "mix":
        assert auto.last_choices == full.last_choices


@pytest.mark.parametrize("method", OBSERVER_NAMES)
def test_per_channel_every_observer(method: str) -> None:
    x = _laplace((5, 4, 30), 11) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])[:, None, None]
    obs = _make(method, ch_axis=0, num_channels=5)
    obs(x)
    scale = obs.compute_scale(qint8)
    assert scale.shape == (5,) and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and (scale >= SCALE_EPS).all()
    for c in range(5):
        single = _make(method)
        single(x[c])
        assert float(scale[c]) == pytest.approx(float(single.compute_scale(qint8)), rel=0.03)
    moved = _make(method, ch_axis=-1, num_channels=5)
    moved(x.permute(1, 2, 0))  # channel last, non-contiguous
    torch.testing.assert_close(moved.compute_scale(qint8), scale, rtol=0.03, atol=0)


# ---------------------------------------------------------------------------------------- buffers


@pytest.mark.parametrize("method", OBSERVER_NAMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip_and_deepcopy(method: str, per_channel: bool) -> None:
    kw = {"ch_axis": 1, "num_channels": 4} if per_channel else {}
    obs = _make(method, **kw)
    for seed in range(2):
        obs(_laplace((3, 4, 40), seed) * (1 + 10 * seed))
    fresh = _make(method, **kw)
    assert not fresh.has_data
    fresh.load_state_dict(obs.state_dict())
    assert fresh.has_data
    for dtype in (qint8, qint16):
        assert torch.equal(fresh.compute_scale(dtype), obs.compute_scale(dtype))
    clone = copy.deepcopy(obs)
    before = obs.compute_scale(qint8).clone()
    clone(_laplace((3, 4, 40), 5) * 1000)
    clone.reset_statistics()
    assert torch.equal(obs.compute_scale(qint8), before)
    assert all(isinstance(b, torch.Tensor) for b in obs.state_dict().values())


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("method", OBSERVER_NAMES)
def test_nonfinite_raises_with_name_and_count(method: str) -> None:
    obs = _make(method, name_for_messages="backbone.conv1")
    x = torch.randn(100)
    x[3], x[7], x[9] = math.nan, math.inf, -math.inf
    before = copy.deepcopy(obs.state_dict())
    obs(x)  # every method is sync-free: counted in the forward, raised when a scale is computed
    for key, value in obs.state_dict().items():  # the batch is not used
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"backbone\.conv1.*non-finite.*1 batch"):
        obs.compute_scale(qint8)
    fresh = _make(method, name_for_messages="backbone.conv1")
    amax, finite = fresh.update_range(x)  # the QAT path never syncs: the batch is counted, not used
    assert not bool(finite) and float(amax) == 0.0 and int(fresh.num_batches) == 0
    with pytest.raises(ValueError, match="backbone.conv1"):
        fresh.check_finite()


@pytest.mark.parametrize("method", OBSERVER_NAMES)
def test_ignore_nonfinite_equals_clean_run(method: str) -> None:
    x = _laplace((3, 200), 12)
    dirty = x.clone()
    dirty[0, 5], dirty[1, 7], dirty[2, 0] = math.nan, math.inf, -math.inf
    keep = torch.isfinite(dirty)
    ignoring, clean = _make(method, ignore_nonfinite=True), _make(method)
    ignoring(dirty)
    clean(dirty[keep])
    for key, value in clean.state_dict().items():
        assert torch.equal(ignoring.state_dict()[key], value), key
    for dtype in (qint8, qint16):
        assert torch.equal(ignoring.compute_scale(dtype), clean.compute_scale(dtype))
    # per channel: each channel equals a clean per-tensor run on that channel's finite values
    pc = _make(method, ch_axis=0, num_channels=3, ignore_nonfinite=True)
    pc(dirty)
    for c in range(3):
        row = _make(method)
        row(dirty[c][keep[c]])
        assert float(pc.min_val[c]) == float(row.min_val) and float(pc.max_val[c]) == float(row.max_val)
        if pc.histogram is not None:
            assert torch.equal(pc.histogram.counts[c], row.histogram.counts[0])
        assert float(pc.compute_scale(qint8)[c]) == pytest.approx(float(row.compute_scale(qint8)), rel=1e-5)


@pytest.mark.parametrize("method", OBSERVER_NAMES)
def test_constant_zero_empty_and_no_data(method: str) -> None:
    for data in (torch.zeros(50), torch.full((7, 3), 2.5), torch.full((5,), -1e-30)):
        obs = _make(method)
        obs(data)
        for dtype in (qint8, qint16):
            scale = obs.compute_scale(dtype)
            assert torch.isfinite(scale).all() and float(scale) >= SCALE_EPS
    zeros = _make(method, ch_axis=0, num_channels=2)
    zeros(torch.zeros(2, 10))
    if method != "fixed":
        assert torch.equal(zeros.compute_scale(qint8), torch.full((2,), SCALE_EPS))
    empty = _make(method, name_for_messages="head.cls")
    empty(torch.empty(0, 3))
    empty.update_range(torch.empty(0))
    assert not empty.has_data
    if method == "fixed":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert float(empty.compute_scale(qint8)) == pytest.approx(3.0 / 127)
    else:
        with pytest.warns(RuntimeWarning, match="head.cls"):
            assert float(empty.compute_scale(qint8)) == DEFAULT_SCALE
        pc = _make(method, ch_axis=0, num_channels=3, name_for_messages="w")
        with pytest.warns(RuntimeWarning, match="'w'"):
            assert torch.equal(pc.compute_scale(qint16), torch.full((3,), DEFAULT_SCALE))


def test_invalid_arguments_list_allowed_values() -> None:
    with pytest.raises(ValueError, match="allowed: minmax, moving_minmax, percentile, kl, mse, mix, fixed"):
        make_observer("entropy")
    with pytest.raises(ValueError, match=r"allowed: bins, max_samples"):
        make_observer("kl", percentile=99.0)
    with pytest.raises(ValueError, match=r"allowed: averaging_constant"):
        make_observer("moving_minmax", bins=512)
    with pytest.raises(ValueError, match="threshold"):
        make_observer("fixed")
    for bad in (0, -1, 100.5, math.nan):
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            make_observer("percentile", percentile=bad)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            make_observer("moving_minmax", averaging_constant=bad)
    for bad in (-1.0, math.inf, math.nan, "x"):
        with pytest.raises(ValueError, match=">= 0"):
            make_observer("fixed", threshold=bad)
    with pytest.raises(ValueError, match=">= 0"):
        make_observer("fixed", ch_axis=0, num_channels=2, threshold=[1.0, -2.0])
    with pytest.raises(ValueError, match="a number or 2 per-channel values"):
        make_observer("fixed", ch_axis=0, num_channels=2, threshold=[1.0, 2.0, 3.0])
    for bad in (64, 1000, 2**17):
        with pytest.raises(ValueError, match=r"power of two in \[256, 65536\]"):
            make_observer("mse", bins=bad)
    with pytest.raises(ValueError, match="max_samples"):
        make_observer("mix", max_samples=10)
    with pytest.raises(ValueError, match="num_channels"):
        make_observer("minmax", ch_axis=0)
    with pytest.raises(ValueError, match="compute_scale needs an integer dtype"):
        make_observer("minmax").compute_scale("float16")


def test_channel_count_change_names_observer_and_counts() -> None:
    obs = make_observer("mse", ch_axis=0, num_channels=8, name_for_messages="layer2.conv")
    obs(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"layer2\.conv.*8 channels.*16 channels"):
        obs(torch.randn(16, 3))
    with pytest.raises(ValueError, match="layer2.conv"):
        obs.update_range(torch.randn(4, 3))


def test_fixed_scale_ignores_data() -> None:
    obs = make_observer("fixed", threshold=200.0, name_for_messages="speed_quant")
    assert float(obs.compute_scale(qint8)) == pytest.approx(200.0 / 127)
    obs(torch.randn(100) * 1000)
    assert float(obs.compute_scale(qint16)) == pytest.approx(200.0 / 32767)
    assert float(obs.max_val) > 200  # still tracked for reports
    pc = make_observer("fixed", ch_axis=0, num_channels=3, threshold=[1.0, 2.0, 0.0])
    torch.testing.assert_close(pc.compute_scale(qint8), torch.tensor([1 / 127, 2 / 127, SCALE_EPS]))


def test_other_input_dtypes() -> None:
    x = torch.randn(64, generator=_gen(13))
    for method in DATA_METHODS:
        half, full = make_observer(method), make_observer(method)
        half(x.half())
        full(x.half().float())
        assert torch.equal(half.compute_scale(qint8), full.compute_scale(qint8))
    ints = make_observer("minmax")
    ints(torch.arange(-5, 9))
    assert float(ints.compute_scale(qint8)) == pytest.approx(8 / 127)


# ------------------------------------------------------------------------------------ property test


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    axis_pick=st.integers(-1, 3),
    method=st.sampled_from(OBSERVER_NAMES),
    log_scale=st.floats(-6, 6),
    seed=st.integers(0, 2**16),
)
def test_property_scale_finite_and_clipping_bounded(
    shape: list[int], axis_pick: int, method: str, log_scale: float, seed: int
) -> None:
    x = _laplace(tuple(shape), seed) * 10**log_scale
    ch_axis = None if axis_pick < 0 or axis_pick >= len(shape) else axis_pick
    kw = {} if ch_axis is None else {"ch_axis": ch_axis, "num_channels": shape[ch_axis]}
    obs = _make(method, **kw)
    obs(x)
    for dtype in (qint8, qint16):
        scale = obs.compute_scale(dtype)
        assert scale.shape == (() if ch_axis is None else (shape[ch_axis],))
        assert torch.isfinite(scale).all() and (scale >= SCALE_EPS).all()
        view = [1] * x.dim()
        if ch_axis is not None:
            view[ch_axis] = -1
        s = scale.reshape(view).double()
        limit = (dtype.qmax + 0.5) * s
        clipped = x.double().abs() > limit * (1 + 1e-6)
        rows = x.abs().double() if ch_axis is None else x.abs().double().movedim(ch_axis, 0)
        rows = rows.reshape(1 if ch_axis is None else shape[ch_axis], -1)
        if method == "minmax":
            assert not clipped.any()
        elif method == "percentile":
            # clips at most the values above the 99.99th percentile, up to one histogram bin
            ref = torch.from_numpy(np.percentile(rows.numpy(), 99.99, axis=1))
            width = obs.histogram.width
            allowed = (rows > (ref - width)[:, None] * (1 - 1e-9)).sum()
            assert int(clipped.sum()) <= int(allowed)
        # no data-driven method clips more than needed: scale <= max|x| / qmax (or the eps floor)
        if method not in ("fixed", "moving_minmax"):
            ub = torch.clamp(rows.amax(1) / dtype.qmax, min=SCALE_EPS) * (1 + 1e-5)
            assert (scale.double().reshape(-1) <= ub).all()


# ------------------------------------------------------------------------------------- distributed


def test_reduce_statistics_without_dist_is_noop() -> None:
    assert not dist.is_initialized()
    for method in OBSERVER_NAMES:
        obs = _make(method)
        obs(torch.randn(100))
        state = copy.deepcopy(obs.state_dict())
        obs.reduce_statistics()
        for key, value in obs.state_dict().items():
            assert torch.equal(value, state[key])


def _rank_batches(rank: int) -> list[torch.Tensor]:
    scale = 1.0 if rank == 0 else 37.0  # different ranges: the histograms must be re-binned
    return [_laplace((6, 400), 100 * rank + i) * scale for i in range(2)]


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        observers = {
            "minmax": make_observer("minmax"),
            "mse": make_observer("mse"),
            "percentile_pc": make_observer("percentile", ch_axis=0, num_channels=6, percentile=99.0),
            "moving_minmax": make_observer("moving_minmax", averaging_constant=0.5),
        }
        for x in _rank_batches(rank):
            for obs in observers.values():
                obs(x)
        moving = observers["moving_minmax"]
        local = torch.stack([moving.avg_min, moving.avg_max])
        for obs in observers.values():
            obs.reduce_statistics()
        out = {k: (o.compute_scale(qint8), o.compute_scale(qint16)) for k, o in observers.items()}
        out["local_moving"] = local
        out["reduced_moving"] = torch.stack([moving.avg_min, moving.avg_max])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduce_statistics_two_process_gloo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_dist_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    union = {
        "minmax": make_observer("minmax"),
        "mse": make_observer("mse"),
        "percentile_pc": make_observer("percentile", ch_axis=0, num_channels=6, percentile=99.0),
    }
    for rank in range(2):
        for x in _rank_batches(rank):
            for obs in union.values():
                obs(x)
    for key, obs in union.items():
        for i, dtype in enumerate((qint8, qint16)):
            assert torch.equal(res[0][key][i], res[1][key][i]), key
            torch.testing.assert_close(res[0][key][i], obs.compute_scale(dtype), rtol=1e-6, atol=0)
    # moving averages: the mean over ranks of the per-rank averages
    avg = (res[0]["local_moving"] + res[1]["local_moving"]) / 2
    torch.testing.assert_close(res[0]["reduced_moving"], avg)
    assert torch.equal(res[0]["reduced_moving"], res[1]["reduced_moving"])
