"""The callback's cosine eval_fn and its search after AdaRound: the reference is the original float model.

AdaRound writes rounded weights into the float weights; the eval_fn (reference and quantized outputs) and
the search run inside ``float_reference``, so their numbers equal those recomputed on a copy of the
prepared model taken before AdaRound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.analysis.state import node_dtypes
from qat_lightning.callbacks import QuantAnalysisCallback, output_cosine_eval_fn
from qat_lightning.ptq import AdaRoundConfig, adaround
from tests.ptq.models import ConvChain, calibrated, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _rounded() -> tuple[nn.Module, nn.Module, list[Tensor]]:
    """A calibrated ConvChain after AdaRound, its copy from before AdaRound, the batches."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 2, 6, 6, generator=gen) for _ in range(3)]
    torch.manual_seed(0)
    qm = calibrated(perturb(ConvChain()), xs)
    reference = copy.deepcopy(qm)
    adaround(qm, xs, config=AdaRoundConfig(iterations=20))
    return qm, reference, xs


def _out(model: nn.Module, x: Tensor, state: ql.FakeQuantState | None = None) -> Tensor:
    with torch.no_grad():
        if state is None:
            return model(x).double().flatten()
        with ql.fake_quant_state(model, state):
            return model(x).double().flatten()


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_output_cosine_eval_fn_compares_with_the_float_model() -> None:
    qm, reference, xs = _rounded()
    x = xs[0]
    want = _out(reference, x, ql.FakeQuantState.FLOAT)
    plain = _cos(_out(qm, x, ql.FakeQuantState.FLOAT), _out(qm, x))  # what fake quant off alone gives
    expected = _cos(want, _out(qm, x))  # the calibrated model as it is
    assert abs(plain - expected) > 1e-5
    eval_fn = output_cosine_eval_fn([x], num_steps=1)
    assert eval_fn(qm) == pytest.approx(expected, rel=0, abs=1e-9)
    # an op raised to int16 (as the search does) quantizes its float weight, not the int8-rounded one
    probe = copy.deepcopy(qm)
    l1 = dict(ql.iter_quant_ops(probe))["l1"]
    with torch.no_grad():
        l1.module.weight.copy_(dict(ql.iter_quant_ops(reference))["l1"].module.weight)
    with node_dtypes({l1.weight_quant: ql.qint16}):
        raised_expected = _cos(want, _out(probe, x))
    with node_dtypes({dict(ql.iter_quant_ops(qm))["l1"].weight_quant: ql.qint16}):
        raised = eval_fn(qm)
    assert raised == pytest.approx(raised_expected, rel=0, abs=1e-9)
    assert abs(raised - expected) > 1e-6  # the raised probe is a different model


def test_output_cosine_eval_fn_refuses_no_batches() -> None:
    """No batch to compare: every probe scored 0.0 (no target could be reached) instead of an error."""
    qm, _, _ = _rounded()
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        output_cosine_eval_fn([torch.zeros(1)], num_steps=0)
    with pytest.raises(ValueError, match="gave no batch"):
        output_cosine_eval_fn([])(qm)


def test_search_runs_against_the_float_model(tmp_path) -> None:
    qm, reference, xs = _rounded()
    x = xs[0]

    def user_eval_fn(model: nn.Module) -> float:  # "fake quant off" as the float reference, per call
        return _cos(_out(model, x, ql.FakeQuantState.FLOAT), _out(model, x))

    callback = QuantAnalysisCallback(
        dataloader=xs, num_steps=1, search_target=2.0, search_eval_fn=user_eval_fn, run_on_fit_end=False
    )
    outcome = callback._analyse(qm, xs, tmp_path, lambda batch: batch)
    baseline = next(p for p in outcome.plan.probes if p.stage == "baseline")
    expected = _cos(_out(reference, x, ql.FakeQuantState.FLOAT), _out(qm, x))
    assert baseline.metric == pytest.approx(expected, rel=0, abs=1e-9)
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(qm))
