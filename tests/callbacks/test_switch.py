"""FakeQuantSwitch: partial quantization by op-name pattern, during chosen stages, always restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cb_helpers import LitClassifier, make_loader, make_trainer, scales
from lightning.pytorch import Callback

import qat_lightning as ql
from qat_lightning.callbacks import (
    Calibration,
    FakeQuantSwitch,
    PrepareQuantization,
    QuantizationAwareTraining,
    bisect_model_blocks,
    float_ops,
)
from qat_lightning.callbacks.switch import matched_nodes
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import ModuleNameTemplate


def _val_loss(model):
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in make_loader(128, 1)]
    return float(sum(losses) / 128)


class StatesInBatch(Callback):
    def __init__(self, node):
        self.node, self.seen = node, set()

    def on_validation_batch_start(self, trainer, pl_module, *args):
        self.seen.add(self.node().state)

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.seen.add(self.node().state)


def _calibrated(tmp_path, data, setter=None):
    lit = LitClassifier()
    make_trainer(tmp_path, [PrepareQuantization(setter), Calibration(10)], max_epochs=0, version=9).fit(
        lit, datamodule=data
    )
    return lit


def test_switch_runs_the_head_in_float_during_validate(tmp_path, data):
    lit = _calibrated(tmp_path, data)
    quantized = make_trainer(tmp_path, [PrepareQuantization()]).validate(lit, datamodule=data, verbose=False)
    switch = FakeQuantSwitch(disable=["head.*"])
    partial = make_trainer(tmp_path, [PrepareQuantization(), switch], version=1).validate(
        lit, datamodule=data, verbose=False
    )
    assert switch.disabled_ops and all(name.startswith("head") for name in switch.disabled_ops)
    with float_ops(lit.model, ["head.*"]):
        expected = _val_loss(lit.model)
    assert partial[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert partial[0]["val_loss"] != pytest.approx(quantized[0]["val_loss"], rel=1e-6)
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(lit.model))


def test_switch_outside_its_stages_does_nothing(tmp_path, data):
    lit = _calibrated(tmp_path, data)
    quantized = make_trainer(tmp_path, [PrepareQuantization()]).validate(lit, datamodule=data, verbose=False)
    switch = FakeQuantSwitch(disable=["head.*"], stages=("test",))
    same = make_trainer(tmp_path, [switch], version=1).validate(lit, datamodule=data, verbose=False)
    assert same == quantized


def test_switch_during_qat_keeps_the_head_unquantized(tmp_path, data):
    lit = _calibrated(tmp_path, data)
    before = scales(lit.model)
    head_nodes = {
        name
        for name, node in ql.iter_fake_quantize(lit.model)
        if any(node is n for n in _head_nodes(lit.model))
    }
    assert head_nodes
    switch = FakeQuantSwitch(disable=["head.*"], stages=("fit",))
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(), switch]
    make_trainer(tmp_path, callbacks, max_epochs=1, version=1).fit(lit, datamodule=data)
    after = scales(lit.model)
    for name in head_nodes:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(after[n], before[n]) for n in after if n not in head_nodes)


def _head_nodes(model):
    return matched_nodes(model, ["head.*"])[1]


def test_fake_cast_false_keeps_float16_nodes_casting(tmp_path, data):
    setter = QconfigSetter(templates=[ModuleNameTemplate({"head": ql.float16})])
    lit = _calibrated(tmp_path, data, setter)
    fp16 = [n for n in _head_nodes(lit.model) if n.dtype.is_float16]
    assert fp16, "the head output should be float16"
    spy_off, spy_on = StatesInBatch(lambda: fp16[0]), StatesInBatch(lambda: fp16[0])
    make_trainer(
        tmp_path, [PrepareQuantization(setter), FakeQuantSwitch(["head"], fake_cast=False), spy_on]
    ).validate(lit, datamodule=data, verbose=False)
    make_trainer(
        tmp_path, [PrepareQuantization(setter), FakeQuantSwitch(["head"]), spy_off], version=1
    ).validate(lit, datamodule=data, verbose=False)
    assert spy_on.seen == {ql.FakeQuantState.VALIDATION}
    assert spy_off.seen == {ql.FakeQuantState.FLOAT}


def test_bisection_on_a_calibrated_model_locates_the_block(tmp_path, data):
    lit = _calibrated(tmp_path, data)
    model = lit.model
    with ql.fake_quant_disabled(model):
        float_loss = _val_loss(model)
    quant_loss = _val_loss(model)
    target = float_loss + 0.25 * (quant_loss - float_loss)
    result = bisect_model_blocks(model, lambda m: -_val_loss(m), target=-target, depth=None)
    assert result.found and result.blocks and result.metric >= -target
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(model))


class _SkipsRestOfEpoch(LitClassifier):
    """``on_train_batch_start`` returns -1 (Lightning: skip the rest of the epoch, no batch-end hooks)."""

    def on_train_batch_start(self, batch, batch_idx):  # noqa: D102
        return -1 if batch_idx == 2 else None


def test_switch_is_undone_when_lightning_skips_the_batch_end(tmp_path, data):
    """The head stayed FLOAT after fit, and a later test put it back in QAT (its observers moved)."""
    lit = _SkipsRestOfEpoch()
    switch = FakeQuantSwitch(disable=["head.*"], stages=("fit",))
    callbacks = [PrepareQuantization(), Calibration(4), QuantizationAwareTraining(), switch]
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_val_batches=0).fit(lit, datamodule=data)
    assert {node.state for _, node in ql.iter_fake_quantize(lit.model)} == {ql.FakeQuantState.VALIDATION}
    before = scales(lit.model)
    seen = set()
    handles = [
        node.register_forward_pre_hook(lambda m, _a: seen.add(m.state)) for node in _head_nodes(lit.model)
    ]
    make_trainer(tmp_path, [PrepareQuantization(), switch], version=1).test(
        lit, datamodule=data, verbose=False
    )
    for handle in handles:
        handle.remove()
    assert seen == {ql.FakeQuantState.VALIDATION}
    after = scales(lit.model)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
