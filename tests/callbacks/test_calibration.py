"""PrepareQuantization + Calibration with a real Trainer: calibration-only runs, idempotence, evaluation."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from cb_helpers import LitClassifier, TinyData, make_loader, make_trainer, scales

import qat_lightning as ql
from qat_lightning.callbacks import CALIBRATED_FLAG, Calibration, PrepareQuantization, calibrate


def _quant_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_calibration_only_run_with_max_epochs_0(tmp_path, lit, data):
    float_params = {k: v.clone() for k, v in lit.model.state_dict().items()}
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(num_batches=8)], max_epochs=0)
    with pytest.warns(UserWarning, match="only 8 batch"):
        trainer.fit(lit, datamodule=data)

    model = lit.model
    nodes = list(ql.iter_fake_quantize(model))
    assert nodes, "the network was not prepared"
    assert bool(getattr(model, CALIBRATED_FLAG))
    assert all(node.state is ql.FakeQuantState.VALIDATION for _, node in nodes)
    assert trainer.global_step == 0
    # the statistics are exactly those of a plain forward-only calibration over the same 8 batches
    reference = LitClassifier()
    reference.model.load_state_dict(float_params)
    PrepareQuantization().setup(trainer, reference, "fit")
    calibrate(reference.model, make_loader(256, 0), num_batches=8)
    ours, theirs = scales(model), scales(reference.model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    # eval mode during calibration: no BatchNorm statistic moved
    for name, value in reference.model.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    log_dir = tmp_path / "run" / "version_0"
    report = (log_dir / "model_check_result.txt").read_text()
    assert "Dtype summary" in report


def test_validate_calibrates_once_and_evaluation_never_touches_observers(tmp_path, lit, data):
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(num_batches=10)])
    first = trainer.validate(lit, datamodule=data, verbose=False)
    assert bool(getattr(lit.model, CALIBRATED_FLAG))
    frozen = _quant_state(lit.model)
    assert trainer.validate(lit, datamodule=data, verbose=False) == first
    trainer.test(lit, datamodule=data, verbose=False)
    trainer.predict(lit, dataloaders=make_loader(64, 3))
    for name, value in lit.model.state_dict().items():
        assert torch.equal(value, frozen[name]), f"{name} changed during evaluation"


def test_setup_twice_does_not_prepare_or_calibrate_twice(tmp_path, lit, data):
    prep, calib = PrepareQuantization(), Calibration(num_batches=10)
    make_trainer(tmp_path, [prep, calib], max_epochs=0).fit(lit, datamodule=data)
    prepared = lit.model
    counts = {n: int(q.observer.num_batches) for n, q in ql.iter_fake_quantize(prepared)}
    make_trainer(tmp_path, [prep, calib], max_epochs=0, version=1).fit(lit, datamodule=data)
    assert lit.model is prepared
    assert {n: int(q.observer.num_batches) for n, q in ql.iter_fake_quantize(prepared)} == counts
    # a fresh callback on an already prepared module leaves it alone too
    make_trainer(tmp_path, [PrepareQuantization(), Calibration()], max_epochs=0, version=2).fit(
        lit, datamodule=data
    )
    assert lit.model is prepared


def test_calibration_from_explicit_batches_and_val_split(tmp_path, lit, data):
    batches = [torch.randn(16, 8) * 3 for _ in range(10)]
    calib = Calibration(num_batches=None, dataloader=batches)
    make_trainer(tmp_path, [PrepareQuantization(), calib], max_epochs=0).fit(lit, datamodule=data)
    assert calib.batches_used == 10
    other = LitClassifier()
    calib_val = Calibration(num_batches=None, dataloader="val")
    make_trainer(tmp_path, [PrepareQuantization(), calib_val], max_epochs=0, version=1).fit(
        other, datamodule=data
    )
    assert calib_val.batches_used == 4  # 128 validation samples / 32


def test_example_inputs_required_without_any_loader(tmp_path):
    lit = LitClassifier()
    lit.example_input_array = None
    trainer = make_trainer(tmp_path, [PrepareQuantization()], max_epochs=0)
    with pytest.raises(ValueError, match="needs example inputs"):
        trainer.predict(lit, dataloaders=make_loader())  # predict loaders are not a train/val/test split
    # the loaders passed to fit() give the example inputs
    trainer = make_trainer(tmp_path, [PrepareQuantization()], max_epochs=0)
    trainer.fit(lit, train_dataloaders=make_loader())
    assert any(True for _ in ql.iter_fake_quantize(lit.model))
    lit = LitClassifier()
    lit.example_input_array = None
    # with explicit example inputs it works
    trainer = make_trainer(tmp_path, [PrepareQuantization(example_inputs=torch.randn(4, 8))], max_epochs=0)
    trainer.fit(lit, train_dataloaders=make_loader())
    assert any(True for _ in ql.iter_fake_quantize(lit.model))


def test_example_inputs_from_the_datamodule(tmp_path, data):
    lit = LitClassifier()
    lit.example_input_array = None
    make_trainer(tmp_path, [PrepareQuantization()], max_epochs=0).fit(lit, datamodule=data)
    assert any(True for _ in ql.iter_fake_quantize(lit.model))


def test_missing_submodule_is_a_clear_error(tmp_path, lit, data):
    trainer = make_trainer(tmp_path, [PrepareQuantization(submodule="net")], max_epochs=0)
    with pytest.raises(ValueError, match="has no submodule 'net'.*model"):
        trainer.fit(lit, datamodule=data)


def test_many_data_small_batches_no_warning(tmp_path, lit):
    data = TinyData(n_train=512)
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(num_batches=12)], max_epochs=0)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Calibration uses only.*")
        trainer.fit(lit, datamodule=data)


def test_calibration_without_prepare_is_a_clear_error(tmp_path, lit, data):
    with pytest.raises(ValueError, match="Calibration: `model` has no quant nodes; add PrepareQuantization"):
        make_trainer(tmp_path, [Calibration(10)], max_epochs=0).fit(lit, datamodule=data)


class _InputDtypes(pl.Callback):
    """Records the dtype of every input the network sees from ``on_fit_start`` on (after prepare)."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_pre_hook(lambda m, args: self.dtypes.append(args[0].dtype))


class _CalibratedBeforeTraining(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.calibrated = bool(getattr(pl_module.model, CALIBRATED_FLAG))


class _NoHooks(LitClassifier):
    """A LightningModule without any ``*_dataloader`` hook: data come only from ``fit()``."""


def test_calibration_sees_the_loaders_passed_to_fit(tmp_path):
    lit, spy = _NoHooks(), _CalibratedBeforeTraining()
    calib = Calibration(num_batches=None)
    trainer = make_trainer(tmp_path, [PrepareQuantization(), calib, spy], limit_train_batches=1)
    trainer.fit(lit, make_loader(256, 0), make_loader(128, 1))
    assert calib.batches_used == 8 and spy.calibrated  # 256 / 32, before the first training step
    reference = LitClassifier()
    make_trainer(tmp_path, [PrepareQuantization(), Calibration(None)], max_epochs=0, version=1).fit(
        reference, datamodule=TinyData()
    )
    ours, theirs = scales(lit.model), scales(reference.model)
    assert ours.keys() == theirs.keys()
    for name in ours:  # the same batches as through the datamodule (the QAT steps then moved the weights)
        if "weight" not in name:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    calib_val = Calibration(num_batches=None, dataloader="val")
    make_trainer(tmp_path, [PrepareQuantization(), calib_val], max_epochs=0, version=2).fit(
        _NoHooks(), make_loader(256, 0), make_loader(128, 1)
    )
    assert calib_val.batches_used == 4


def test_an_empty_calibration_loader_raises_and_marks_nothing_calibrated(tmp_path, lit, data):
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(dataloader=[])], max_epochs=0)
    with pytest.raises(ValueError, match="calibration loader is empty"):
        trainer.fit(lit, datamodule=data)
    assert not bool(getattr(lit.model, CALIBRATED_FLAG))
    assert all(not bool(node.scale_ready) for _, node in ql.iter_fake_quantize(lit.model))


def test_bf16_true_calibration_feeds_bf16_batches(tmp_path):
    lit, spy = _NoHooks(), _InputDtypes()
    callbacks = [PrepareQuantization(), spy, Calibration(num_batches=4)]
    trainer = make_trainer(
        tmp_path, callbacks, max_epochs=0, precision="bf16-true", enable_model_summary=False
    )
    with pytest.warns(UserWarning, match="only 4 batch"):
        trainer.fit(lit, make_loader(256, 0), make_loader(128, 1))
    assert spy.dtypes[:4] == [torch.bfloat16] * 4
    assert bool(getattr(lit.model, CALIBRATED_FLAG))
    integer = [node for _, node in ql.iter_fake_quantize(lit.model) if node.dtype.is_integer]
    assert integer and all(bool(node.scale_ready) for node in integer)


@pytest.mark.parametrize("source", ["fit_loaders", "datamodule"])
def test_force_recalibrates_once_per_fit_and_never_at_evaluation(tmp_path, source):
    lit, calib = _NoHooks(), Calibration(num_batches=4, force=True)
    callbacks = [PrepareQuantization(), calib, ql.callbacks.QuantizationAwareTraining()]
    data = {"datamodule": TinyData()} if source == "datamodule" else {}
    fit_data = data or {"train_dataloaders": make_loader(256, 0), "val_dataloaders": make_loader(128, 1)}
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=3)
    with pytest.warns(UserWarning, match="only 4 batch"):
        trainer.fit(lit, **fit_data)
    trained = _quant_state(lit.model)
    counts = {n: int(q.observer.num_batches) for n, q in ql.iter_fake_quantize(lit.model)}
    # the QAT-trained scales survive evaluation (and no train loader is needed for it)
    trainer.validate(lit, **(data or {"dataloaders": make_loader(128, 1)}), verbose=False)
    trainer.test(lit, **(data or {"dataloaders": make_loader(128, 2)}), verbose=False)
    for name, value in lit.model.state_dict().items():
        assert torch.equal(value, trained[name]), f"{name} changed during validate/test"
    trainer.predict(lit, dataloaders=make_loader(64, 3))
    for name, value in lit.model.state_dict().items():
        assert torch.equal(value, trained[name]), f"{name} changed during predict"
    # a second fit recalibrates once more (force): 4 more batches in every observer that counts them
    with pytest.warns(UserWarning, match="only 4 batch"):
        make_trainer(tmp_path, callbacks, max_epochs=0, version=1).fit(lit, **fit_data)
    after = {n: int(q.observer.num_batches) for n, q in ql.iter_fake_quantize(lit.model)}
    assert any(counts[n] > 0 for n in counts)
    assert all(after[n] == counts[n] + 4 for n in counts if counts[n] > 0)
