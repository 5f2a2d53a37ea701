"""After AdaRound / bias correction the float reference is still the original float model (digits, real data).

AdaRound writes its rounded weights into the float weights and bias correction shifts the biases; both
record what they overwrote, bias correction measures against the original float model, and the analysis
(one model) uses it as its reference. Every expectation is recomputed here from a copy of the prepared
model taken before any post-training step (its FLOAT state is the float model).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.ptq import AdaRoundConfig, adaround, bias_correction
from qat_lightning.ptq.float_record import (
    float_record_state,
    load_float_record_state,
    original_float_parameters,
)
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.quant.nodes.int_bias import _bias_nodes
from tests.ptq.models import ConvChain, calibrated, digits_mlp, perturb

FAST = AdaRoundConfig(iterations=100)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, nn.Module, Tensor]:
    torch.set_num_threads(1)
    return digits_mlp()


def _fresh(digits: tuple[nn.Module, nn.Module, Tensor]) -> tuple[nn.Module, nn.Module, Tensor, list[Tensor]]:
    """The calibrated model, a copy kept as the float reference, the data, the calibration batches."""
    _, qm, x = digits
    return copy.deepcopy(qm), copy.deepcopy(qm), x, list(x[:512].split(128))


def _run(model: nn.Module, x: Tensor, state: ql.FakeQuantState) -> Tensor:
    with torch.no_grad(), ql.fake_quant_state(model, state):
        return model(x)


def _op_means(model: nn.Module, name: str, xs: list[Tensor], state: ql.FakeQuantState) -> Tensor:
    """Mean per output channel of op ``name``'s output on ``xs`` in ``state``, its own output node off."""
    op = dict(ql.iter_quant_ops(model))[name]
    seen: list[Tensor] = []
    handle = op.register_forward_hook(lambda _m, _a, y: seen.append(y.double().reshape(-1, y.shape[-1])))
    with torch.no_grad(), ql.fake_quant_state(model, state):
        with ql.fake_quant_state(op.output_quant, ql.FakeQuantState.FLOAT):
            for x in xs:
                model(x)
    handle.remove()
    return torch.cat(seen).mean(0)


def _bias_step(model: nn.Module, name: str) -> float:
    """One step of the op's deployed int32 bias (``s_in * s_w``): the corrected bias is rounded to it."""
    op = dict(ql.iter_quant_ops(model))[name]
    nodes = _bias_nodes(op, op.module.bias)
    return 0.0 if nodes is None else float((nodes[0].scale * nodes[1].scale).max())


def test_bias_correction_twice_is_the_same_model_as_once(digits) -> None:
    qm, reference, x, batches = _fresh(digits)
    bias_correction(qm, batches)
    once = {k: v.clone() for k, v in qm.state_dict().items()}
    result = bias_correction(qm, batches)
    assert result.rows  # it ran on every op again, from the original biases
    for key, value in qm.state_dict().items():
        torch.testing.assert_close(value, once[key], rtol=0, atol=1e-6, msg=key)
    # the float reference is the float model, the biases' float values recorded
    want = _run(reference, x, ql.FakeQuantState.FLOAT)
    with float_reference(qm):
        torch.testing.assert_close(_run(qm, x, ql.FakeQuantState.FLOAT), want, rtol=0, atol=1e-5)
    assert set(original_float_parameters(qm)) == {"fc1.module.bias", "fc2.module.bias", "fc3.module.bias"}


def test_adaround_then_bias_correction_corrects_against_the_original_float(digits) -> None:
    qm, reference, x, batches = _fresh(digits)
    only_bc = copy.deepcopy(qm)
    bias_correction(only_bc, batches)
    adaround(qm, batches, config=FAST)
    float_ = {n: _op_means(reference, n, batches, ql.FakeQuantState.FLOAT) for n in ("fc2", "fc3")}
    rounded = (_op_means(qm, "fc3", batches, ql.FakeQuantState.VALIDATION) - float_["fc3"]).abs().max()
    bias_correction(qm, batches)
    for name in ("fc2", "fc3"):  # no fused ReLU: the mean error against the float model is zeroed
        step = _bias_step(qm, name)
        assert step < 0.1 * float(rounded)  # the check below can tell a correction from none
        for model in (qm, only_bc):
            error = _op_means(model, name, batches, ql.FakeQuantState.VALIDATION) - float_[name]
            assert float(error.abs().max()) <= step + 1e-5, name
    # and the output on held-out digits is far closer to the float model's than with AdaRound alone
    ada = copy.deepcopy(reference)
    adaround(ada, batches, config=FAST)
    held_out, ref_out = x[1000:], _run(reference, x[1000:], ql.FakeQuantState.FLOAT)
    err_both = (_run(qm, held_out, ql.FakeQuantState.VALIDATION) - ref_out).mean(0).abs().mean()
    err_ada = (_run(ada, held_out, ql.FakeQuantState.VALIDATION) - ref_out).mean(0).abs().mean()
    assert float(err_both) < 0.5 * float(err_ada)


def test_single_model_sensitivity_after_adaround_measures_against_the_float_model(digits, tmp_path) -> None:
    qm, reference, x, batches = _fresh(digits)
    adaround(qm, batches, config=FAST)
    inputs = x[:256]
    qa = ql.QuantAnalysis(qm, out_dir=tmp_path)
    rows = {r.op_name: r.metric for r in qa.sensitivity(inputs=inputs, types=["weight"], plot=False)[0].rows}
    # recomputed: the float model with only that op's weight node on, holding AdaRound's rounded weight
    ref_out = _run(reference, inputs, ql.FakeQuantState.FLOAT)
    ops = dict(ql.iter_quant_ops(qm))
    for name in ("fc1", "fc2", "fc3"):
        probe = copy.deepcopy(reference)
        op = dict(ql.iter_quant_ops(probe))[name]
        with torch.no_grad():
            op.module.weight.copy_(ops[name].module.weight)
        ql.set_fake_quantize(probe, ql.FakeQuantState.FLOAT)
        op.weight_quant.state = ql.FakeQuantState.VALIDATION
        with torch.no_grad():  # L1: mean |float - probe|
            expected = float((ref_out.double() - probe(inputs).double()).abs().mean())
        assert expected > 1e-3
        assert rows[name] == pytest.approx(expected, rel=1e-4), name
    qa.run([inputs])  # per layer: the float side is the float model too
    row = qa.compare_per_layer(plot=False).row("fc3")
    assert row.base_model_mean == pytest.approx(float(ref_out.double().mean()), abs=1e-5)


def test_conv_bn_round_trip_deepcopy_and_outdated_records() -> None:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 2, 6, 6, generator=gen) for _ in range(3)]
    torch.manual_seed(0)
    qm = calibrated(perturb(ConvChain()), xs)
    reference = copy.deepcopy(qm)
    adaround(qm, xs, config=AdaRoundConfig(iterations=20))
    bias_correction(qm, xs)
    recorded = set(original_float_parameters(qm))
    assert {"c1.conv.weight", "c1.bn.bias", "l2.module.weight", "l2.module.bias"} <= recorded  # BN beta too
    want = _run(reference, xs[0], ql.FakeQuantState.FLOAT)
    calib = _run(qm, xs[0], ql.FakeQuantState.VALIDATION)
    assert float((_run(qm, xs[0], ql.FakeQuantState.FLOAT) - want).abs().max()) > 1e-3  # plain FLOAT moved
    for model in (qm, copy.deepcopy(qm)):
        with float_reference(model):
            got_float = _run(model, xs[0], ql.FakeQuantState.FLOAT)
            got_calib = _run(model, xs[0], ql.FakeQuantState.VALIDATION)
        torch.testing.assert_close(got_float, want, rtol=0, atol=1e-4)
        torch.testing.assert_close(got_calib, calib, rtol=0, atol=0)  # the calibrated model is unchanged
    # a checkpoint: the state_dict into a fresh copy, the records through float_record_state
    fresh = copy.deepcopy(reference)
    fresh.load_state_dict(qm.state_dict())
    state = float_record_state(qm)
    with pytest.warns(UserWarning, match="no record of their original float values"):
        with float_reference(fresh):
            pass
    load_float_record_state(fresh, state)
    with float_reference(fresh):
        torch.testing.assert_close(_run(fresh, xs[0], ql.FakeQuantState.FLOAT), want, rtol=0, atol=1e-4)
    # trained after the post-training steps (QAT): the records no longer describe the model and are ignored
    l2 = dict(ql.iter_quant_ops(fresh))["l2"]
    with torch.no_grad():
        l2.module.weight.add_(0.01)
    assert set(original_float_parameters(fresh)) == recorded - {"l2.module.weight"}
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.001)
    assert original_float_parameters(fresh) == {}
    with float_reference(fresh):
        got = _run(fresh, xs[0], ql.FakeQuantState.FLOAT)
    torch.testing.assert_close(got, _run(fresh, xs[0], ql.FakeQuantState.FLOAT), rtol=0, atol=0)
