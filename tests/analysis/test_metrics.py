"""Metrics, streaming statistics, model I/O helpers and index-op replay, against float64 hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qat_lightning.analysis.compare.index_ops import IndexRecorder, IndexReplayer
from qat_lightning.analysis.compare.metrics import (
    Metric,
    badness,
    error_name,
    error_value,
    per_sample,
    resolve_metric,
    resolve_metrics,
    whole,
)
from qat_lightning.analysis.compare.stats import ClipStats, PairStats
from qat_lightning.analysis.inputs import (
    concat_samples,
    default_input_fn,
    flatten_outputs,
    select_samples,
)
from qat_lightning.quant.nodes.functional import fake_quantize


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _hand(name: str, a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    d = a - b
    if name == "COSINE":
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))
    if name == "L1":
        return float(np.abs(d).mean())
    if name == "ATOL":
        return float(np.abs(d).max())
    if name == "MSE":
        return float((d * d).mean())
    if name == "SQNR":
        return float(10 * np.log10((a @ a) / (d @ d)))
    if name == "KL":
        p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        q = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        return float((p * np.log(p / q)).sum())
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["COSINE", "L1", "ATOL", "MSE", "SQNR", "KL"])
def test_per_sample_metrics_match_float64_hand_computation(name: str, generator: torch.Generator) -> None:
    base = torch.randn(5, 3, 4, generator=generator)
    analy = base + 0.1 * torch.randn(5, 3, 4, generator=generator)
    metric = resolve_metric(name.lower())
    got = per_sample(metric, base, analy)
    want = [_hand(name, _np(base[i]), _np(analy[i])) for i in range(5)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    if name != "KL":
        assert whole(metric, base, analy) == pytest.approx(_hand(name, _np(base), _np(analy)), rel=1e-12)


def test_metric_edge_cases_and_orientation() -> None:
    zero = torch.zeros(2, 3)
    cos = resolve_metric("COSINE")
    assert per_sample(cos, zero, zero).tolist() == [1.0, 1.0]
    assert per_sample(cos, zero, torch.ones(2, 3)).tolist() == [0.0, 0.0]
    sqnr = resolve_metric("SQNR")
    assert per_sample(sqnr, torch.ones(1, 3), torch.ones(1, 3)).item() == math.inf
    # badness: larger = worse, NaN worst
    assert badness(cos, torch.tensor([0.5, 0.25], dtype=torch.float64)).tolist() == [-0.5, -0.25]
    assert badness(resolve_metric("L1"), torch.tensor([math.nan, 1.0]))[0] == math.inf
    assert error_value(cos, 0.75) == 0.25 and error_name(cos) == "1-COSINE"
    assert error_value(sqnr, 30.0) == -30.0 and error_name(sqnr) == "-SQNR"
    assert error_value(resolve_metric("L1"), 2.0) == 2.0


def test_custom_metric_and_bad_names() -> None:
    def maxrel(base: torch.Tensor, analy: torch.Tensor) -> float:
        return float(((base - analy).abs() / base.abs().clamp_min(1e-3)).max())

    metric = resolve_metric(maxrel)
    assert metric.name == "maxrel" and not metric.higher_is_better
    base = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    assert per_sample(metric, base, base * 1.5).tolist() == pytest.approx([0.5, 0.5])
    wrapped = Metric(
        "agree", lambda a, b: float((a.sign() == b.sign()).float().mean()), higher_is_better=True
    )
    assert resolve_metric(wrapped) is wrapped
    with pytest.raises(ValueError, match="allowed: COSINE, L1"):
        resolve_metric("L3")
    with pytest.raises(ValueError, match="unique"):
        resolve_metrics(["L1", "l1"])


def test_pair_stats_columns_match_hand_computation_over_batches(generator: torch.Generator) -> None:
    batches = [torch.randn(4, 6, generator=generator) * (i + 1) for i in range(3)]
    noisy = [b + 0.05 * torch.randn(b.shape, generator=generator) for b in batches]
    noisy[1][0, 0] = 0.0
    batches[1][0, 1] = 0.0  # a zero in the float values: excluded from rtol
    stats = PairStats()
    for a, b in zip(batches, noisy, strict=True):
        stats.update(a, b)
    a = np.concatenate([_np(x).ravel() for x in batches])
    b = np.concatenate([_np(x).ravel() for x in noisy])
    d = a - b
    assert stats.cosine == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), rel=1e-12)
    assert stats.mse == pytest.approx((d * d).mean(), rel=1e-12)
    assert stats.l1 == pytest.approx(np.abs(d).mean(), rel=1e-12)
    assert stats.sqnr == pytest.approx(10 * np.log10((a @ a) / (d @ d)), rel=1e-12)
    assert stats.max_abs == pytest.approx(np.abs(d).max(), rel=1e-12)
    nz = a != 0
    assert stats.max_rel == pytest.approx((np.abs(d[nz]) / np.abs(a[nz])).max(), rel=1e-12)
    assert stats.base.mean == pytest.approx(a.mean(), rel=1e-12)
    assert stats.base.var == pytest.approx(a.var(), rel=1e-12)
    assert stats.analy.var == pytest.approx(b.var(), rel=1e-12)
    assert (stats.base.min, stats.base.max) == (a.min(), a.max())
    kl = np.mean(
        [_hand("KL", _np(x[i]), _np(y[i])) for x, y in zip(batches, noisy, strict=True) for i in range(4)]
    )
    assert stats.kl == pytest.approx(kl, rel=1e-10)


def test_pair_stats_nonfinite_counted_and_excluded_from_moments() -> None:
    stats = PairStats()
    base = torch.tensor([[1.0, math.inf, 3.0, math.nan]])
    stats.update(base, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert stats.base.nonfinite == 2 and stats.analy.nonfinite == 0
    assert stats.base.max == 3.0 and stats.base.mean == 2.0


def test_clip_stats_split_clipping_and_rounding(generator: torch.Generator) -> None:
    x = torch.randn(1000, generator=generator) * 2
    scale = torch.tensor(1.5 / 127)
    q = fake_quantize(x, scale, "qint8")
    clip = ClipStats()
    clip.update(x, q, scale, -128, 127, None)
    xd, qd = _np(x), _np(q)
    ratio = xd / (1.5 / 127)
    mask = (ratio > 127.5) | (ratio < -128.5)
    err = (qd - xd) ** 2
    assert clip.clip_error == pytest.approx(err[mask].sum(), rel=1e-12)
    assert clip.round_error == pytest.approx(err[~mask].sum(), rel=1e-12)
    assert clip.clip_ratio == pytest.approx(mask.mean())
    assert 0.9 < clip.clip_share < 1.0  # values up to ~6 clipped at 1.5 dominate the error


def test_default_input_fn_and_sample_helpers() -> None:
    x = torch.arange(12.0).reshape(4, 3)
    assert default_input_fn(x)[0] is x
    assert default_input_fn((x, torch.zeros(4)))[0] is x
    assert default_input_fn({"a": x}) == {"a": x}
    with pytest.raises(ValueError, match="input_fn"):
        default_input_fn(3)
    inputs = (x, {"mask": torch.ones(4, 2), "k": 2}, torch.zeros(7))
    one = select_samples(inputs, 2, 4)
    assert one[0].tolist() == [[6.0, 7.0, 8.0]] and one[1]["k"] == 2 and one[2].shape == (7,)
    both = concat_samples([select_samples(inputs, i, 4) for i in (1, 3)])
    assert both[0].tolist() == [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]] and both[1]["mask"].shape == (2, 2)


def test_flatten_outputs_names_like_the_seed() -> None:
    t = torch.zeros(1)
    assert [n for n, _ in flatten_outputs(t)] == ["0"]
    assert [n for n, _ in flatten_outputs((t, t, t))] == ["0-0", "0-1", "0-2"]
    assert [n for n, _ in flatten_outputs((t, (t, {"box": t}), None))] == ["0-0", "0-1-0", "0-1-1-box"]
    assert [n for n, _ in flatten_outputs({"cls": t, "aux": [t, t]})] == ["cls", "aux-0", "aux-1"]


def test_index_replay_reuses_float_indices(generator: torch.Generator) -> None:
    x = torch.randn(4, 6, generator=generator)
    y = x + 0.5 * torch.randn(4, 6, generator=generator)

    def fn(t: torch.Tensor):
        top = torch.topk(t, 2, dim=1)
        return top.values, top.indices, t.argsort(dim=1), torch.argmax(t), t.sort(dim=0)[0], t.argmin(dim=1)

    recorder = IndexRecorder()
    with recorder:
        ref = fn(x)
    assert [r.kind for r in recorder.records] == ["topk", "argsort", "argmax", "sort", "argmin"]
    replayer = IndexReplayer(recorder.records)
    with replayer:
        out = fn(y)
    assert replayer.replayed == 5 and not replayer.diverged
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2]) and torch.equal(out[3], ref[3])
    assert torch.equal(out[0], y.gather(1, ref[1]))  # values follow the float order, carry y's values
    assert torch.equal(out[4], y.gather(0, x.sort(dim=0)[1]))
    with pytest.warns(UserWarning, match="index-op replacement stopped"):
        with IndexReplayer(recorder.records):
            torch.topk(torch.randn(3, 6), 2)  # other shape: computed normally from then on
