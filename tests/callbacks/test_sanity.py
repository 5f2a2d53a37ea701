"""SanityCheck: passes on a healthy pipeline, fails loudly on a broken one (data preprocessing mismatch)."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import LitClassifier, TinyData, make_loader, make_trainer
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qat_lightning import FakeQuantState, iter_fake_quantize, set_fake_quantize
from qat_lightning.callbacks import (
    Calibration,
    PrepareQuantization,
    QuantizationAwareTraining,
    SanityCheck,
    SanityCheckError,
)


def _scalars(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _run(tmp_path, mode, data, calib_split="train", lr=0.01, tolerance=0.05, extra=(), **kwargs):
    lit = LitClassifier(lr=lr)
    check = SanityCheck(mode=mode, monitor="val_acc", tolerance=tolerance)
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=None, dataloader=calib_split),
        QuantizationAwareTraining(),
        check,
        *extra,
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, **kwargs)
    return lit, check, trainer


class WeightsAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}


def test_lr0_passes_on_a_healthy_pipeline_and_holds_the_weights(tmp_path):
    spy = WeightsAtTrainStart()
    lit, check, trainer = _run(tmp_path, "lr0", TinyData(), extra=[spy])
    trainer.fit(lit, datamodule=TinyData())
    assert check.result.status == "PASS", check.result.render()
    for name, value in lit.model.named_parameters():
        assert torch.equal(value, spy.weights[name]), name
    log_dir = tmp_path / "run" / "version_0"
    text = (log_dir / "sanity_check.txt").read_text()
    assert "Sanity check (lr0): PASS" in text and "monitor: val_acc" in text
    scalars = _scalars(log_dir)
    assert scalars["sanity/lr0/passed"] == [1.0]
    assert scalars["sanity/lr0/reference"] == [pytest.approx(check.result.reference)]


def test_lr0_fails_loudly_on_a_preprocessing_mismatch(tmp_path):
    # calibration and validation see the real preprocessing, QAT training data is scaled x4
    broken = TinyData(train_shift=5.0)
    lit, check, trainer = _run(tmp_path, "lr0", broken, calib_split="val")
    with pytest.raises(
        SanityCheckError, match=r"(?s)Sanity check \(lr0\): FAIL.*reference \(calibration model\)"
    ):
        trainer.fit(lit, datamodule=broken)
    text = (tmp_path / "run" / "version_0" / "sanity_check.txt").read_text()
    assert "FAIL" in text and "training data pipeline" in text
    assert "cause: the training batches differ from the data the model was calibrated on" in text
    assert "BatchNorm input mean shift" in text
    assert _scalars(tmp_path / "run" / "version_0")["sanity/lr0/passed"] == [0.0]


def test_float_passes_on_a_healthy_pipeline(tmp_path):
    lit, check, trainer = _run(tmp_path, "float", TinyData(), lr=0.001)
    trainer.fit(lit, datamodule=TinyData())
    assert check.result.status == "PASS", check.result.render()
    assert "reference (float model)" in (tmp_path / "run" / "version_0" / "sanity_check.txt").read_text()


def test_float_fails_loudly_on_a_preprocessing_mismatch(tmp_path):
    broken = TinyData(train_shift=5.0)
    lit, check, trainer = _run(tmp_path, "float", broken, lr=0.001)
    with pytest.raises(SanityCheckError, match=r"(?s)Sanity check \(float\): FAIL.*remove prepare"):
        trainer.fit(lit, datamodule=broken)


class HeadInFloat(Callback):
    """A user's partial quantization: the head's quant nodes stay FLOAT."""

    def on_train_start(self, trainer, pl_module):
        set_fake_quantize(pl_module.model.head, "float")


@pytest.mark.parametrize("sanity_steps", [0, 2])
@pytest.mark.parametrize("mode", ["lr0", "float"])
def test_nodes_the_user_kept_in_float_stay_float_after_the_check(tmp_path, mode, sanity_steps):
    # sanity_steps=2 is Lightning's default: its validation runs before the check records the user's states
    lit, check, trainer = _run(
        tmp_path, mode, TinyData(), lr=0.001, extra=[], num_sanity_val_steps=sanity_steps
    )
    trainer.callbacks.insert(trainer.callbacks.index(check), HeadInFloat())
    trainer.fit(lit, datamodule=TinyData())
    states = {name: node.state for name, node in iter_fake_quantize(lit.model)}
    head = [name for name in states if name.startswith("head")]
    assert head and all(states[name] is FakeQuantState.FLOAT for name in head)
    rest = [state for name, state in states.items() if not name.startswith("head")]
    assert rest and all(state is FakeQuantState.VALIDATION for state in rest)


def test_missing_monitor_is_a_clear_error(tmp_path):
    lit = LitClassifier()
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(10), SanityCheck(monitor="val_f1")])
    with pytest.raises(ValueError, match="does not log 'val_f1'.*val_acc"):
        trainer.fit(lit, datamodule=TinyData())
    assert "INCOMPLETE" in (tmp_path / "run" / "version_0" / "sanity_check.txt").read_text()


def test_no_failure_raise_when_disabled(tmp_path):
    broken = TinyData(train_shift=5.0)
    lit = LitClassifier()
    check = SanityCheck(mode="lr0", monitor="val_acc", tolerance=0.0, raise_on_failure=False)
    callbacks = [
        PrepareQuantization(),
        Calibration(None, dataloader="val"),
        QuantizationAwareTraining(),
        check,
    ]
    with pytest.warns(UserWarning, match="SANITY CHECK FAILED"):
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(lit, datamodule=broken)
    assert check.result.status == "FAIL"


class StateAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_lr0_holds_scales_and_bn_statistics_so_the_metric_is_exact(tmp_path):
    # calibrated on the validation split, trained on another sample of the same distribution: QAT would
    # move the scales and BN statistics a little; the check holds them, so nothing may change at all
    lit, spy = LitClassifier(), StateAtTrainStart()
    check = SanityCheck(mode="lr0", monitor="val_loss", tolerance=0.0)
    callbacks = [
        PrepareQuantization(),
        Calibration(None, dataloader="val"),
        QuantizationAwareTraining(),
        spy,
        check,
    ]
    make_trainer(tmp_path, callbacks, max_epochs=2).fit(lit, datamodule=TinyData())
    assert check.result.status == "PASS", check.result.render()
    assert check.result.result == check.result.reference
    for key, value in lit.model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, spy.state[key]), key
    assert all(m.momentum == 0.1 for m in lit.model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    drift = check.result.drift
    assert drift is not None and drift.batches == 16 and 0 < drift.bn_shift < 1.0
    text = (tmp_path / "run" / "version_0" / "sanity_check.txt").read_text()
    assert "activation scales and BN statistics held" in text and "data drift over 16 training batch" in text


@pytest.mark.parametrize("monitor_mode", ["max", None])
def test_float_check_is_one_sided_with_a_monitor_mode(tmp_path, monitor_mode):
    lit = LitClassifier(lr=0.001)
    check = SanityCheck(
        mode="float", monitor="val_acc", tolerance=0.0, reference=0.25, monitor_mode=monitor_mode,
        raise_on_failure=False,
    )  # fmt: skip
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(), check]
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2).fit(lit, datamodule=TinyData())
    result = check.result
    assert result.result > 0.25  # the trained float model scores far better than this reference
    text = (tmp_path / "run" / "version_0" / "sanity_check.txt").read_text()
    if monitor_mode == "max":
        assert result.status == "PASS" and "one-sided (max): scoring better than the reference passes" in text
    else:
        assert result.status == "FAIL" and "two-sided (pass monitor_mode to accept improvements)" in text


def test_float_reference_measured_at_train_start_says_what_it_is(tmp_path):
    lit, check, trainer = _run(tmp_path, "float", TinyData(), lr=0.001)
    trainer.fit(lit, datamodule=TinyData())
    assert "not a float fine-tune of the same length and settings" in check.result.note


def test_unknown_monitor_mode_is_refused():
    with pytest.raises(ValueError, match="monitor_mode='up' is not supported; allowed: None, 'min', 'max'"):
        SanityCheck(monitor_mode="up")


def test_float_check_after_lightnings_sanity_validation_leaves_a_quantized_model(tmp_path):
    lit, check, trainer = _run(tmp_path, "float", TinyData(), lr=0.001, num_sanity_val_steps=2)
    trainer.fit(lit, datamodule=TinyData())
    assert check.result.status == "PASS", check.result.render()
    assert {node.state for _, node in iter_fake_quantize(lit.model)} == {FakeQuantState.VALIDATION}
    tested = trainer.test(lit, datamodule=TinyData(), verbose=False)[0]["test_acc"]
    set_fake_quantize(lit.model, FakeQuantState.VALIDATION)
    assert tested == trainer.test(lit, datamodule=TinyData(), verbose=False)[0]["test_acc"]


class SmallBatches(TinyData):
    """The same training data in batches of ``batch_size``, shifted by ``shift`` input std (std 2)."""

    def __init__(self, batch_size: int, shift: float = 0.0) -> None:
        super().__init__()
        self.batch_size, self.shift = batch_size, shift

    def train_dataloader(self):
        return make_loader(self.n_train, 0, shift=2.0 * self.shift, batch_size=self.batch_size, shuffle=True)


@pytest.mark.parametrize("batch_size", [4, 8])
def test_lr0_does_not_cry_wolf_on_small_batches_of_the_same_data(tmp_path, batch_size):
    torch.manual_seed(0)
    lit = LitClassifier()
    check = SanityCheck(mode="lr0", monitor="val_loss", tolerance=0.0, raise_on_failure=False)
    callbacks = [PrepareQuantization(), Calibration(None), QuantizationAwareTraining(), check]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=32)
    trainer.fit(lit, datamodule=SmallBatches(batch_size))
    drift = check.result.drift
    assert check.result.status == "PASS", check.result.render()
    assert drift.batches == 32 and drift.bn_samples == 32 * batch_size and drift.bn_shift < 0.5


def test_lr0_flags_training_data_shifted_by_one_and_a_half_std_on_small_batches(tmp_path):
    torch.manual_seed(0)
    lit = LitClassifier()
    check = SanityCheck(mode="lr0", monitor="val_loss", tolerance=0.0, raise_on_failure=False)
    callbacks = [
        PrepareQuantization(),
        Calibration(None, dataloader="val"),
        QuantizationAwareTraining(),
        check,
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=32)
    with pytest.warns(UserWarning, match="SANITY CHECK FAILED"):
        trainer.fit(lit, datamodule=SmallBatches(4, shift=1.5))
    assert check.result.status == "FAIL" and check.result.drift.bn_mismatch
    assert "cause: the training batches differ" in check.result.note
