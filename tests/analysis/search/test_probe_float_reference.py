"""A search called directly after AdaRound probes against the original float model (``float_reference``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.ptq import AdaRoundConfig, adaround
from tests.ptq.models import ConvChain, calibrated, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _out(model: nn.Module, x: Tensor, state: str | None = None) -> Tensor:
    with torch.no_grad():
        if state is None:
            return model(x).double().flatten()
        with ql.fake_quant_state(model, state):
            return model(x).double().flatten()


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_search_mixed_precision_probes_against_the_float_model(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 2, 6, 6, generator=gen) for _ in range(3)]
    torch.manual_seed(0)
    qm = calibrated(perturb(ConvChain()), xs)
    reference = copy.deepcopy(qm)
    adaround(qm, xs, config=AdaRoundConfig(iterations=20))
    x = xs[0]
    tables = ql.QuantAnalysis(qm, out_dir=tmp_path).sensitivity(inputs=x, plot=False)

    def eval_fn(model: nn.Module) -> float:  # "fake quant off" as the float reference, per call
        return _cos(_out(model, x, "float"), _out(model, x))

    plan = ql.search_mixed_precision(qm, tables, eval_fn, target=2.0)  # unreachable: every stage probes
    baseline = next(p for p in plan.probes if p.stage == "baseline")
    expected = _cos(_out(reference, x, "float"), _out(qm, x))
    assert abs(_cos(_out(qm, x, "float"), _out(qm, x)) - expected) > 1e-5  # the rounded "float" differs
    assert baseline.metric == pytest.approx(expected, rel=0, abs=1e-9)
