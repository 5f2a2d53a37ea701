"""The histogram observers' calibration update: no host sync, fullgraph compile, same counts as a reference.

The references are float64 numpy re-computations of the documented rules (``observers/histogram.py``):
exact binning of ``|x|`` at the final power-of-two range without sampling; the strided / chunked
subsample with its rotating start, per-row weights and the exact tail of block maxima with it.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qat_lightning as ql
from qat_lightning.quant.dtypes import qint8, qint16
from qat_lightning.quant.observers import make_observer
from qat_lightning.quant.observers.histogram import SAMPLE_CHUNK, TAIL_SHARE, _prime_at_least
from qat_lightning.quant.observers.histogram_batch import RANGE_MIN, TAIL_BLOCK, pow2_ceil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import TinyResNet  # noqa: E402
from test_node_device_neutral import _SyncCounter  # noqa: E402  (tests/quant is on sys.path under pytest)

HIST_METHODS = ("percentile", "kl", "mse", "mix")


def _batches(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    """Laplace-like batches with exact zeros whose range grows (the histogram is re-binned)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).log().neg() * 1.9**i
        out.append(torch.where(torch.rand(shape, generator=gen) < 0.05, 0.0, x))
    return out


def _pow2_ceil(a: float) -> float:
    if a <= 0:
        return 0.0
    mant, exp = math.frexp(a)
    return max(a if mant == 0.5 else 2.0**exp, RANGE_MIN)


def _rebin(counts: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    out = np.zeros_like(counts)
    j = np.arange(counts.shape[1], dtype=np.float64)
    for r in range(counts.shape[0]):
        factor = new[r] / old[r] if old[r] > 0 else 1.0
        np.add.at(out[r], np.ceil(j / factor).astype(np.int64), counts[r])
    return out


def _bin(a: np.ndarray, inv_w: float, bins: int) -> np.ndarray:
    return np.bincount(np.ceil(a * inv_w).astype(np.int64), minlength=bins + 1).astype(np.float64)


def _reference(
    batches: list[torch.Tensor], rows: int, bins: int, cap: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy histogram by the documented rules (per tensor when ``rows == 1``, else channel 0)."""
    counts, rng = np.zeros((rows, bins + 1)), np.zeros(rows)
    for b, x in enumerate(batches):
        x2 = x.double().numpy().reshape(rows, -1)
        a2 = np.abs(x2)
        new = np.maximum(rng, [_pow2_ceil(v) for v in a2.max(1)])
        counts, rng = _rebin(counts, rng, new), new
        length = x2.shape[1]
        for r in range(rows):
            inv_w = bins / max(rng[r], RANGE_MIN)
            if cap is None or length <= cap:
                counts[r] += _bin(a2[r], inv_w, bins)
            elif rows > 1:
                step = _prime_at_least(-(-length // cap))
                sample = a2[r, b % step :: step]
                counts[r] += _bin(sample, inv_w, bins) * (length / sample.size)
            else:
                n_chunks = length // SAMPLE_CHUNK
                step = _prime_at_least(-(-n_chunks * SAMPLE_CHUNK // cap))
                sample = a2[0, : n_chunks * SAMPLE_CHUNK].reshape(n_chunks, SAMPLE_CHUNK)[b % step :: step]
                bulk = _bin(sample.ravel(), inv_w, bins) * (length / sample.size)
                n_blocks = length // TAIL_BLOCK
                blocks = a2[0, : n_blocks * TAIL_BLOCK].reshape(n_blocks, TAIL_BLOCK)
                tail = np.concatenate([blocks.max(1), a2[0, n_blocks * TAIL_BLOCK :]])
                top = _bin(tail, inv_w, bins)
                cut = (np.cumsum(top) < tail.size * (1 - TAIL_SHARE)).sum()
                counts[0] += np.where(np.arange(bins + 1) <= cut, bulk, top)
    return counts, rng


# ----------------------------------------------------------------------------------------- same counts
@pytest.mark.parametrize("method", HIST_METHODS)
def test_unsampled_counts_equal_numpy_histogram(method: str) -> None:
    """Without sampling the counts are exact: numpy's binning of every batch at the final range."""
    batches = _batches((4, 8, 300), 4, seed=1)
    for kwargs, rows in (({}, 1), ({"ch_axis": 1, "num_channels": 8}, 8)):
        obs = make_observer(method, max_samples=None, **kwargs)
        for x in batches:
            obs(x)
        view = [x.movedim(1, 0) if rows > 1 else x for x in batches]
        counts, rng = _reference(view, rows, obs.histogram.bins, None)
        assert np.array_equal(obs.histogram.counts.numpy(), counts)
        assert np.array_equal(obs.histogram.hist_range.numpy(), rng)
        assert int(obs.num_batches) == len(batches)


@pytest.mark.parametrize("rows", [1, 8])
def test_sampled_counts_equal_reference(rows: int) -> None:
    """The subsample (rotating start, computed on the device), its weights and the exact tail."""
    obs = make_observer("percentile", **({} if rows == 1 else {"ch_axis": 0, "num_channels": rows}))
    batches = _batches((rows, 40_003) if rows > 1 else (3, 40_003), 5, seed=2)
    for x in batches:
        obs(x)
    cap = obs.histogram.sample_cap(batches[0].numel() // rows)
    counts, rng = _reference(batches, rows, obs.histogram.bins, cap)
    np.testing.assert_allclose(obs.histogram.counts.numpy(), counts, rtol=1e-12, atol=0)
    assert np.array_equal(obs.histogram.hist_range.numpy(), rng)


def test_half_precision_input_bins_like_float32() -> None:
    x = _batches((2, 5000), 1, seed=3)[0].half()
    half, ref = make_observer("kl", max_samples=None), make_observer("kl", max_samples=None)
    half(x)
    ref(x.float())
    assert torch.equal(half.histogram.counts, ref.histogram.counts)
    assert torch.equal(half.compute_scale(qint8), ref.compute_scale(qint8))


def test_pow2_ceil_is_exact() -> None:
    values = [0.0, 2.0**-80, 2.0**-64, 1e-30, 0.3, 0.5, 0.75, 1.0, 1.0000001, 3.0, 2.0**40, 3.4e38]
    got = pow2_ceil(torch.tensor(values, dtype=torch.float64)).tolist()
    assert got == [_pow2_ceil(v) for v in values]


def test_merged_ranks_equal_one_observer_on_all_batches() -> None:
    """What ``reduce`` does (re-bin to the largest range, sum) equals one observer on the union, exactly."""
    a, b, union = (make_observer("mse", ch_axis=0, num_channels=3, max_samples=None) for _ in range(3))
    for i, x in enumerate(_batches((3, 500), 4, seed=4)):
        (a if i % 2 else b)(x * (40.0 if i % 2 else 1.0))
        union(x * (40.0 if i % 2 else 1.0))
    common = torch.maximum(a.histogram.hist_range, b.histogram.hist_range)
    a.histogram.rebin(common)
    b.histogram.rebin(common)
    assert torch.equal(a.histogram.counts + b.histogram.counts, union.histogram.counts)


# ------------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("rows", [1, 4])
def test_nonfinite_rows_are_counted_not_used(rows: int) -> None:
    """A row holding NaN/inf leaves its statistics unchanged; the error comes with the scale."""
    obs = make_observer("kl", **({} if rows == 1 else {"ch_axis": 0, "num_channels": rows}))
    good, bad = _batches((rows, 50_000), 2, seed=5)
    bad[0, 7] = math.nan
    bad[-1, 9] = math.inf
    obs(good)
    before = copy.deepcopy(obs.state_dict())
    obs(bad)  # no exception in the forward
    ok = torch.isfinite(bad).all(1).reshape(obs.min_val.shape)
    low = torch.minimum(before["min_val"], bad.amin(1).reshape(ok.shape))
    expect_min = torch.where(ok, low, before["min_val"])
    assert torch.equal(obs.min_val, expect_min)
    counts, old = obs.histogram.counts, before["histogram.counts"]
    skipped = ~ok.reshape(-1)
    assert torch.equal(counts[skipped], old[skipped])
    assert rows == 1 or not torch.equal(counts[~skipped], old[~skipped])
    assert int(obs.num_batches) == (1 if rows == 1 else 2) and int(obs.nonfinite_batches) == 1
    with pytest.raises(ValueError, match="non-finite.*1 batch"):
        obs.compute_scale(qint8)


def test_ignore_nonfinite_sampled_rows_keep_their_finite_count() -> None:
    obs = make_observer("mse", ch_axis=0, num_channels=2, ignore_nonfinite=True)
    x = _batches((2, 70_000), 1, seed=6)[0]
    x[0, ::7] = math.nan
    x[1, ::11] = -math.inf
    obs(x)
    finite = torch.isfinite(x).sum(1, dtype=torch.float64)
    torch.testing.assert_close(obs.histogram.total(), finite, rtol=1e-12, atol=0)
    assert int(obs.nonfinite_batches) == 0 and obs.compute_scale(qint8).isfinite().all()


# ------------------------------------------------------------------------------- syncs and compile
@pytest.mark.parametrize("method", HIST_METHODS)
def test_calibration_with_histogram_observers_reads_nothing_back(method: str) -> None:
    torch.manual_seed(0)
    example = TinyResNet.example_inputs()
    model = ql.prepare(TinyResNet(), example, ql.get_qconfig(observer=method, weight_observer=method))
    ql.set_fake_quantize(model, "calibration")
    with torch.no_grad(), _SyncCounter() as counter:
        model(*example)
        model(example[0] * 3)  # range growth: re-binning
    assert counter.syncs == []


@pytest.mark.slow
@pytest.mark.parametrize("method", HIST_METHODS)
def test_histogram_calibration_compiles_fullgraph_and_matches_eager(method: str) -> None:
    """inductor, fullgraph: a per-tensor (subsampled, tail) and a per-channel node, bit for bit."""
    nodes = torch.nn.ModuleList(
        [
            ql.FakeQuantize("qint8", method),
            ql.FakeQuantize("qint8", method, ch_axis=1, num_channels=8),
        ]
    )
    ql.set_fake_quantize(nodes, "calibration")
    eager = copy.deepcopy(nodes)

    def run(mods: torch.nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return mods[1](mods[0](x))

    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    for x in _batches((4, 8, 40, 40), 3, seed=7):
        compiled(nodes, x)
        run(eager, x)
    for (name, a), b in zip(nodes.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ql.set_fake_quantize(nodes, "validation")
    ql.set_fake_quantize(eager, "validation")
    for a, b in zip(nodes, eager, strict=True):
        assert torch.equal(a.scale, b.scale)
        assert torch.equal(a.observer.compute_scale(qint16), b.observer.compute_scale(qint16))
