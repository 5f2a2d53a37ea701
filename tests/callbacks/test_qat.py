"""QuantizationAwareTraining with a real Trainer: calibration + QAT, from a checkpoint, warmup, reload."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import IN, LitClassifier, accuracy, make_loader, make_trainer, scales
from lightning.pytorch import Callback

import qat_lightning as ql
from qat_lightning.callbacks import (
    CALIBRATED_FLAG,
    Calibration,
    PrepareQuantization,
    QuantizationAwareTraining,
    io_quant_nodes,
    load_quantized_checkpoint,
    prepare_submodule,
)
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import ModuleNameTemplate


class Boom:
    """A 'dataloader' that fails when read: proves calibration did not run."""

    def __iter__(self):
        raise AssertionError("calibration ran although the model was calibrated")


class StatesAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.scales = scales(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.states = {n.state for _, n in ql.iter_fake_quantize(pl_module.model)}

    def on_validation_batch_start(self, trainer, pl_module, *args):
        self.val_states = {n.state for _, n in ql.iter_fake_quantize(pl_module.model)}
        self.val_reuse = {bool(op.__dict__.get("_reuse_fold")) for op in _conv_bn_ops(pl_module.model)}


def _conv_bn_ops(model):
    from qat_lightning.quant.nodes.qat_modules import QatConvBn

    return [m for m in model.modules() if isinstance(m, QatConvBn)]


def _calibrated_checkpoint(tmp_path, data):
    lit = LitClassifier()
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=10)], max_epochs=0, version=9
    )
    trainer.fit(lit, datamodule=data)
    path = tmp_path / "calibrated.ckpt"
    trainer.save_checkpoint(path)
    return lit, path


def test_calibration_then_qat(tmp_path, lit, data):
    spy = StatesAtTrainStart()
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=10),
        QuantizationAwareTraining(fix_scales="input_output"),
        spy,
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, num_sanity_val_steps=1)
    trainer.fit(lit, datamodule=data)
    model = lit.model
    assert spy.states == {ql.FakeQuantState.QAT}
    assert spy.val_states == {ql.FakeQuantState.VALIDATION}
    assert spy.val_reuse == {True}  # BN folds reused in the validation loop (frozen_parameters) ...
    assert _conv_bn_ops(lit.model) and not any(  # ... and only there
        "_reuse_fold" in op.__dict__ or "_fold_cache" in op.__dict__ for op in _conv_bn_ops(lit.model)
    )
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(model))
    after = scales(model)
    fixed = {id(node) for _, node in io_quant_nodes(model)}
    assert fixed and all(n.is_fixed for _, n in io_quant_nodes(model))
    moved = 0
    for name, node in ql.iter_fake_quantize(model):
        if id(node) in fixed:
            torch.testing.assert_close(after[name], spy.scales[name], rtol=0, atol=0, msg=name)
        elif not torch.equal(after[name], spy.scales[name]):
            moved += 1
    assert moved > 0, "QAT did not update any scale"
    assert accuracy(model, make_loader(128, 1)) > 0.8


def test_qat_from_a_calibrated_checkpoint_never_recalibrates(tmp_path, data):
    calibrated, path = _calibrated_checkpoint(tmp_path, data)
    spy = StatesAtTrainStart()
    lit = LitClassifier()
    callbacks = [PrepareQuantization(), Calibration(dataloader=Boom()), QuantizationAwareTraining(), spy]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1)
    trainer.fit(lit, datamodule=data, ckpt_path=path)
    assert bool(getattr(lit.model, CALIBRATED_FLAG))
    for name, value in scales(calibrated.model).items():
        torch.testing.assert_close(spy.scales[name], value, rtol=0, atol=0, msg=name)
    assert trainer.global_step == 8


@pytest.mark.parametrize(
    ("scheduler", "needle"),
    [
        ("linear_warmup", "LinearLR rises"),
        ("lambda_warmup", "LambdaLR's factor rises"),
        ("sequential_warmup", "SequentialLR"),
    ],
)
def test_warmup_is_refused(tmp_path, data, scheduler, needle):
    lit = LitClassifier(scheduler=scheduler)
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(10), QuantizationAwareTraining()], max_epochs=1
    )
    with pytest.raises(ValueError, match=f"QAT refuses learning-rate warmup: .*{needle}.*no warmup"):
        trainer.fit(lit, datamodule=data)
    assert all(n.state is not ql.FakeQuantState.QAT for _, n in ql.iter_fake_quantize(lit.model))


def test_decay_scheduler_and_check_lr_off_are_accepted(tmp_path, data):
    make_trainer(
        tmp_path,
        [PrepareQuantization(), Calibration(10), QuantizationAwareTraining()],
        max_epochs=1,
        limit_train_batches=2,
    ).fit(LitClassifier(scheduler="cosine"), datamodule=data)
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(check_lr=False)]
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, version=1).fit(
        LitClassifier(scheduler="linear_warmup"), datamodule=data
    )


def test_too_many_qat_steps_warn(tmp_path, lit, data):
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(float_steps=20)]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=5)
    with pytest.warns(UserWarning, match="5 optimizer steps, 25% of the float training's 20.*at most 20%"):
        trainer.fit(lit, datamodule=data)


def test_fix_all_scales_keeps_activation_scales(tmp_path, lit, data):
    spy = StatesAtTrainStart()
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(fix_scales="all"), spy]
    make_trainer(tmp_path, callbacks, max_epochs=1).fit(lit, datamodule=data)
    for name, node in ql.iter_fake_quantize(lit.model):
        if node.ch_axis is None and node.dtype.is_integer:
            assert node.is_fixed
            torch.testing.assert_close(node.scale, spy.scales[name], rtol=0, atol=0)


def test_freeze_bn_keeps_running_statistics(tmp_path, lit, data):
    def bn_stats(model):
        return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}

    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(bn_mode="freeze_bn")]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=0)
    trainer.fit(lit, datamodule=data)
    before = bn_stats(lit.model)
    assert before, "the prepared model should keep BN running statistics"
    make_trainer(tmp_path, callbacks, max_epochs=1, version=1).fit(lit, datamodule=data)
    for name, value in bn_stats(lit.model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_resume_with_other_qat_settings_is_refused(tmp_path, lit, data):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(), ckpt]
    make_trainer(tmp_path, callbacks, max_epochs=1, enable_checkpointing=True).fit(lit, datamodule=data)
    other = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(fix_scales="all")]
    with pytest.raises(ValueError, match="fix_scales=None.*this run uses fix_scales='all'"):
        make_trainer(tmp_path, other, max_epochs=2, version=1).fit(
            LitClassifier(), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )


def test_resume_with_a_different_recipe_is_refused(tmp_path, data):
    _, path = _calibrated_checkpoint(tmp_path, data)
    int16 = QconfigSetter(templates=[ModuleNameTemplate({"": ql.qint16})])
    callbacks = [PrepareQuantization(int16), Calibration(10), QuantizationAwareTraining()]
    with pytest.raises(
        ValueError, match="(?s)different quantization recipe.*this run qint16.*checkpoint qint8"
    ):
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(LitClassifier(), datamodule=data, ckpt_path=path)
    with pytest.raises(ValueError, match="different quantization recipe"):
        make_trainer(tmp_path, callbacks[:1], version=1).validate(
            LitClassifier(), datamodule=data, ckpt_path=path
        )


def test_strict_reload_of_a_quantized_checkpoint(tmp_path, lit, data):
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining()]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1)
    trainer.fit(lit, datamodule=data)
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(16, IN)
    lit.eval()
    with torch.no_grad():
        expected = lit(x)

    with pytest.raises(RuntimeError, match="Unexpected key"):
        LitClassifier.load_from_checkpoint(path)  # the float network cannot hold the quant buffers
    reloaded = load_quantized_checkpoint(LitClassifier, path, example_inputs=torch.randn(4, IN))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
    assert bool(getattr(reloaded.model, CALIBRATED_FLAG))
    # plain torch.load + a prepared module + strict load_state_dict is what the helper does
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.endswith("scale") for k in state)
    int16 = QconfigSetter(templates=[ModuleNameTemplate({"": ql.qint16})])
    with pytest.raises(ValueError, match="different quantization recipe"):
        load_quantized_checkpoint(LitClassifier(), path, qconfig_setter=int16)


def _with_bn_checkpoint(tmp_path, data, **prepare_kw):
    """Calibrate the trained TinyNet prepared with qat_mode="with_bn" (BN kept unfolded) and save it."""
    lit = LitClassifier()
    callbacks = [PrepareQuantization(qat_mode="with_bn", **prepare_kw), Calibration(num_batches=4)]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=0, limit_val_batches=2)
    trainer.fit(lit, datamodule=data)
    path = tmp_path / "with_bn.ckpt"
    trainer.save_checkpoint(path)
    lit.eval()
    return lit, path


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_reload_takes_the_checkpoints_qat_mode_and_refuses_another(tmp_path, data):
    lit, path = _with_bn_checkpoint(tmp_path, data)
    x = torch.randn(16, IN)
    with torch.no_grad():
        expected = lit(x)
    given = LitClassifier()
    float_net, before = given.model, _state(given)
    with pytest.raises(
        ValueError,
        match=r"with_bn\.ckpt was made with PrepareQuantization\(qat_mode='with_bn'\) but "
        r"load_quantized_checkpoint was given qat_mode='fuse_bn'; .*pass qat_mode='with_bn', or leave "
        r"qat_mode unset",
    ):
        load_quantized_checkpoint(given, path, qat_mode="fuse_bn")
    # refused before anything changed: the float network is still in place, weights untouched
    assert given.model is float_net and not any(isinstance(m, ql.FakeQuantize) for m in given.modules())
    after = _state(given)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the same mode, given or left unset (the checkpoint's), reproduces the saved model bit for bit
    for qat_mode in ("with_bn", None):
        reloaded = load_quantized_checkpoint(LitClassifier, path, qat_mode=qat_mode)
        assert reloaded.model.prepare_record.qat_mode == "with_bn"
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)


def test_reload_refuses_another_chip_and_a_network_prepared_otherwise(tmp_path, data):
    _, path = _with_bn_checkpoint(tmp_path, data, chip="j6m")
    with pytest.raises(
        ValueError,
        match=r"PrepareQuantization\(chip='j6m'\) but load_quantized_checkpoint was given chip='j6p'",
    ):
        load_quantized_checkpoint(LitClassifier, path, chip="j6p")
    with pytest.raises(
        ValueError,
        match=r"PrepareQuantization\(qat_mode='with_bn', chip='j6m'\) but load_quantized_checkpoint was "
        r"given qat_mode='freeze_bn', chip='j6e'; .*pass qat_mode='with_bn', chip='j6m'",
    ):
        load_quantized_checkpoint(LitClassifier, path, qat_mode="freeze_bn", chip="j6e")
    # a network the caller prepared already (fuse_bn) is not silently kept for a with_bn checkpoint
    given = LitClassifier()
    prepare_submodule(given, example_inputs=torch.zeros(2, IN), chip="j6m")
    prepared, before = given.model, _state(given)
    with pytest.raises(
        ValueError,
        match=r"PrepareQuantization\(qat_mode='with_bn'\) but the network passed in is already prepared with "
        r"qat_mode='fuse_bn'",
    ):
        load_quantized_checkpoint(given, path)
    assert given.model is prepared and all(torch.equal(before[k], v) for k, v in given.state_dict().items())
    reloaded = load_quantized_checkpoint(LitClassifier, path, chip="J6M")  # the same chip, spelled otherwise
    assert reloaded.model.prepare_record.chip == "j6m"
    assert reloaded.model.prepare_record.qat_mode == "with_bn"


def test_prepare_callback_refuses_a_checkpoint_of_other_settings():
    callback = PrepareQuantization(qat_mode="fuse_bn", chip="j6m")
    with pytest.raises(
        ValueError,
        match=r"^the checkpoint was made with PrepareQuantization\(qat_mode='with_bn'\) but this run uses "
        r"qat_mode='fuse_bn'; use the same setting to resume$",
    ):
        callback.load_state_dict({"qat_mode": "with_bn", "chip": "j6m"})
    with pytest.raises(ValueError, match=r"\(qat_mode='with_bn', chip='j6p'\) but this run uses qat_mode="):
        callback.load_state_dict({"qat_mode": "with_bn", "chip": "j6p"})
    callback.load_state_dict({"qat_mode": "fuse_bn", "chip": "J6M", "method": "eager"})  # method: not checked


class SelfPreparingLit(LitClassifier):
    """The documented pattern: prepare in on_load_checkpoint so load_from_checkpoint loads strictly."""

    def on_load_checkpoint(self, checkpoint):
        prepare_submodule(self, example_inputs=torch.zeros(2, IN))


def test_load_from_checkpoint_with_prepare_in_on_load_checkpoint(tmp_path, lit, data):
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(10)], max_epochs=0)
    trainer.fit(lit, datamodule=data)
    path = tmp_path / "calibrated.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SelfPreparingLit.load_from_checkpoint(path, strict=True)
    x = torch.randn(8, IN)
    lit.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), lit(x), rtol=0, atol=0)


def test_chip_option(tmp_path, data):
    lit = LitClassifier()
    make_trainer(tmp_path, [PrepareQuantization(chip="j6m")], max_epochs=0).fit(lit, datamodule=data)
    assert lit.model.prepare_record.chip == "j6m"
    setter = QconfigSetter(chip="j6p")
    with pytest.raises(ValueError, match="chip='j6m' disagrees with the qconfig_setter's chip 'j6p'"):
        make_trainer(tmp_path, [PrepareQuantization(setter, chip="j6m")], max_epochs=0, version=1).fit(
            LitClassifier(), datamodule=data
        )


class TrainingFlags(Callback):
    """Records, at each training step, whether the network and its BatchNorms are in train mode."""

    def on_train_batch_start(self, trainer, pl_module, *args):
        modules = list(pl_module.model.modules())
        self.network = all(m.training for m in modules if not isinstance(m, torch.nn.BatchNorm1d))
        self.bn = [m.training for m in modules if isinstance(m, torch.nn.BatchNorm1d)]


def _running_means(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}


@pytest.mark.parametrize("bn_mode", [None, "freeze_bn"])
def test_qat_after_a_reload_trains_in_train_mode(tmp_path, data, bn_mode):
    lit = LitClassifier()
    calib = make_trainer(tmp_path, [PrepareQuantization(), Calibration(10)], max_epochs=0, version=0)
    calib.fit(lit, datamodule=data)
    ckpt = tmp_path / "calibration.ckpt"
    calib.save_checkpoint(ckpt)
    reloaded = load_quantized_checkpoint(LitClassifier, ckpt)
    assert not reloaded.training  # returned in eval mode, ready for evaluation
    before = _running_means(reloaded.model)
    assert before
    flags = TrainingFlags()
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(bn_mode=bn_mode), flags]
    make_trainer(tmp_path, callbacks, limit_train_batches=3, version=1).fit(reloaded, datamodule=data)
    assert flags.network
    after = _running_means(reloaded.model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    if bn_mode == "freeze_bn":
        assert flags.bn == [False] and moved == []
    else:
        assert flags.bn == [True] and moved == list(before)


def test_qat_refuses_an_uncalibrated_model_with_one_error(tmp_path, lit, data):
    trainer = make_trainer(tmp_path, [PrepareQuantization(), QuantizationAwareTraining()], max_epochs=1)
    with pytest.raises(
        ql.UncalibratedModelError, match=r"QuantizationAwareTraining: the model is not calibrated"
    ):
        trainer.fit(lit, datamodule=data)
    assert trainer.global_step == 0
    other = LitClassifier()
    callbacks = [PrepareQuantization(), QuantizationAwareTraining(strict=False)]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, version=1)
    with pytest.warns(RuntimeWarning, match="not calibrated") as caught:
        trainer.fit(other, datamodule=data)
    assert sum("not calibrated" in str(w.message) for w in caught) == 1
    assert trainer.global_step == 2
