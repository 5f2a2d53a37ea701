"""A QAT run killed mid-training and resumed with ckpt_path ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import Crash, LitClassifier, TinyData, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

import qat_lightning as ql
from qat_lightning.callbacks import (
    Calibration,
    PrepareQuantization,
    QuantizationAwareTraining,
    QuantStatsMonitor,
)
from qat_lightning.callbacks._scale_group import place_scale_group


def _callbacks(ckpt_dir, every_n_train_steps=None):
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=-1, every_n_train_steps=every_n_train_steps
    )
    return [
        PrepareQuantization(),
        Calibration(num_batches=10),
        QuantizationAwareTraining(fix_scales="input_output"),
        QuantStatsMonitor(),
        checkpoint,
    ]


def _run(tmp_path, name, crash_at=None, ckpt_path=None, every_n_train_steps=None, version=0):
    lit = LitClassifier(scheduler="cosine")
    callbacks = _callbacks(tmp_path / name, every_n_train_steps)
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    trainer = make_trainer(
        tmp_path / name, callbacks, max_epochs=3, enable_checkpointing=True, version=version
    )
    trainer.fit(lit, datamodule=TinyData(resumable=True), ckpt_path=ckpt_path)
    return lit, trainer


def _assert_same_state(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("every_n_train_steps", [None, 4], ids=["epoch-end", "mid-epoch"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, every_n_train_steps):
    reference, _ = _run(tmp_path, "straight", every_n_train_steps=every_n_train_steps)

    crashed = LitClassifier(scheduler="cosine")
    callbacks = [*_callbacks(tmp_path / "crash", every_n_train_steps), Crash(13)]
    trainer = make_trainer(tmp_path / "crash", callbacks, max_epochs=3, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="simulated crash at step 13"):
        trainer.fit(crashed, datamodule=TinyData(resumable=True))
    # on_exception left nothing in QAT state
    assert all(n.state is not ql.FakeQuantState.QAT for _, n in ql.iter_fake_quantize(crashed.model))

    last = tmp_path / "crash" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] in (8, 12)
    resumed, trainer = _run(
        tmp_path, "crash", ckpt_path=last, every_n_train_steps=every_n_train_steps, version=1
    )
    assert trainer.global_step == 24
    _assert_same_state(resumed, reference)


# ------------------------------------------------------------------------------------- learned (LSQ) scales
class _LateRestore(SingleDeviceStrategy):
    """A strategy restoring the model after the optimizers exist (as DeepSpeed does)."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def _learned_run(tmp_path, name, max_epochs, ckpt_path=None, strategy="auto"):
    lit = LitClassifier(scheduler="cosine")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, filename="{epoch}", save_top_k=-1)
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=4),
        QuantizationAwareTraining(scales="learned"),
        checkpoint,
    ]
    trainer = make_trainer(
        tmp_path / name,
        callbacks,
        max_epochs=max_epochs,
        enable_checkpointing=True,
        limit_train_batches=3,
        limit_val_batches=1,
        strategy=strategy,
    )
    trainer.fit(lit, datamodule=TinyData(), ckpt_path=ckpt_path)
    return lit, trainer


def _learned_params(lit):
    return [n.scale_param for _, n in ql.iter_fake_quantize(lit.model) if n.scale_mode == "learned"]


def _assert_same_optimizer(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    for ga, gb in zip(sa["param_groups"], sb["param_groups"], strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"
        }
    assert sa["state"].keys() == sb["state"].keys()
    for index, state in sa["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(sb["state"][index][key], value, rtol=0, atol=0, msg=f"{index}.{key}")


@pytest.mark.parametrize("strategy", ["auto", "late_restore"])
def test_learned_scales_resume_equals_straight_run(tmp_path, strategy):
    """Learned (LSQ) scales: 2 epochs straight == 1 epoch + ckpt_path resume, scale group included."""
    straight, trainer_a = _learned_run(tmp_path, "straight", max_epochs=2)
    ckpt = tmp_path / "straight" / "epoch=0.ckpt"
    late = _LateRestore(device=torch.device("cpu")) if strategy == "late_restore" else "auto"
    resumed, trainer_b = _learned_run(tmp_path, "resumed", max_epochs=2, ckpt_path=ckpt, strategy=late)
    assert trainer_b.global_step == trainer_a.global_step == 6

    learned_a, learned_b = _learned_params(straight), _learned_params(resumed)
    assert learned_a and len(learned_a) == len(learned_b)
    for pa, pb in zip(learned_a, learned_b, strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
    _assert_same_state(resumed, straight)

    opt_a, opt_b = trainer_a.optimizers[0], trainer_b.optimizers[0]
    assert len(opt_a.param_groups) == len(opt_b.param_groups) == 2
    for opt, lit in ((opt_a, straight), (opt_b, resumed)):  # the scales: their own group, only there
        learned = {id(p) for p in _learned_params(lit)}
        assert [id(p) for p in opt.param_groups[-1]["params"]] == [id(p) for p in _learned_params(lit)]
        assert not learned & {id(p) for p in opt.param_groups[0]["params"]}
    _assert_same_optimizer(opt_a, opt_b)


def test_place_scale_group_is_idempotent_and_keeps_a_group_of_exactly_the_scales():
    w, b, s1, s2 = (torch.nn.Parameter(torch.ones(1)) for _ in range(4))
    opt = torch.optim.SGD([{"params": [w, s1, b]}, {"params": [s2]}], lr=0.1)
    assert place_scale_group(opt, [s1, s2])
    assert [g["params"] for g in opt.param_groups] == [[w, b], [s1, s2]]  # the emptied group is dropped
    assert not place_scale_group(opt, [s1, s2])
    opt = torch.optim.SGD([{"params": [w, b]}, {"params": [s2, s1], "lr": 0.5}], lr=0.1)
    assert place_scale_group(opt, [s1, s2])  # the user's scale group is kept, hyper-parameters too
    assert [(g["params"], g["lr"]) for g in opt.param_groups] == [([w, b], 0.1), ([s1, s2], 0.5)]
    assert not place_scale_group(opt, [])
