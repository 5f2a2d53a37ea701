"""kl calibration against torch.ao's HistogramObserver: SQNR on heavy-tailed, normal and uniform data."""

from __future__ import annotations

import math

import pytest
import torch
from torch.ao.quantization import HistogramObserver

from qat_lightning.quant.dtypes import QuantDtype, qint8, qint16
from qat_lightning.quant.observers import make_observer
from qat_lightning.quant.observers.histogram_error import coarsen, estimate_mse
from qat_lightning.quant.observers.kl_search import KL_MAX_MSE_LOSS, kl_threshold


def _sample(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "student_t3":  # N / sqrt(chi2_3 / 3)
        chi2 = torch.randn((3, *shape), generator=gen).pow(2).sum(0)
        return torch.randn(shape, generator=gen) / (chi2 / 3).sqrt()
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    return torch.rand(shape, generator=gen) * 2 - 1


def _sqnr(x: torch.Tensor, scale: float, dtype: QuantDtype) -> float:
    x = x.double()
    q = torch.clamp(torch.round(x / scale), -dtype.qmax - 1, dtype.qmax) * scale
    return float(10 * torch.log10(x.pow(2).mean() / (x - q).pow(2).mean()))


@pytest.mark.parametrize("dtype", [qint8, qint16], ids=["int8", "int16"])
@pytest.mark.parametrize("kind", ["student_t3", "normal", "uniform"])
@pytest.mark.parametrize("shape,batches,seed", [((4096,), 1, 1), ((8, 128), 2, 2), ((16, 1024), 2, 3)])
def test_kl_sqnr_within_0_2_db_of_torch_ao_histogram_observer(kind, dtype, shape, batches, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    data = [_sample(kind, shape, gen) for _ in range(batches)]
    ao = HistogramObserver(
        dtype=torch.qint8 if dtype is qint8 else torch.qint32,
        qscheme=torch.per_tensor_symmetric,
        quant_min=-dtype.qmax - 1,
        quant_max=dtype.qmax,
    )
    kl = make_observer("kl")
    for batch in data:
        ao(batch)
        kl(batch)
    x = torch.cat([b.reshape(-1) for b in data])  # the data both calibrated on
    ours = _sqnr(x, float(kl.compute_scale(dtype)), dtype)
    ref = _sqnr(x, float(ao.calculate_qparams()[0]), dtype)
    assert ours >= ref - 0.2, (ours, ref)


def test_guard_bounds_the_estimated_error_and_recovers_heavy_tails() -> None:
    gains = []
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        for kind in ("student_t3", "normal", "uniform"):
            obs = make_observer("kl")
            obs(_sample(kind, (4096,), gen))
            counts, width = coarsen(obs.histogram.counts, obs.histogram.width)
            amax = obs.observed_amax().double().reshape(-1)
            plain = kl_threshold(counts, width, amax, qint8.qmax, max_mse_loss=math.inf)
            guarded = kl_threshold(counts, width, amax, qint8.qmax)
            nq = qint8.qmax + 1  # kl's candidates: nq bins up to the last non-empty bin
            last = int((counts[0, 1:] > 0).nonzero().max()) + 1
            edges = torch.arange(nq, last + 1, dtype=torch.float64)[None, :] * width[:, None]
            best = estimate_mse(counts, width, torch.minimum(edges, amax[:, None]), qint8.qmax).amin(1)
            err = estimate_mse(counts, width, guarded[:, None], qint8.qmax)[:, 0]
            assert bool((err <= best * (1 + KL_MAX_MSE_LOSS) * (1 + 1e-9)).all()), (seed, kind)
            if kind == "student_t3":
                plain_err = estimate_mse(counts, width, plain[:, None], qint8.qmax)[:, 0]
                gains.append(float(10 * torch.log10(plain_err / err)))
    assert max(gains) > 3.0  # unguarded entropy calibration clips Student-t(3) far too much: dB lost
