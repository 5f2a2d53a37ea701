"""QatLrProbe: fixed-LR fine-tunes at train start, states restored, best LR on optimizer + scheduler."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import LitClassifier, make_trainer, scales
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from qat_lightning.callbacks import Calibration, PrepareQuantization, QatLrProbe, QuantizationAwareTraining


class Spy(Callback):
    def on_train_start(self, trainer, pl_module):
        self.params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.scales = scales(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == 0:
            opt = trainer.optimizers[0]
            self.lr = opt.param_groups[0]["lr"]
            self.base_lrs = list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)
            self.opt_state = len(opt.state)


def test_probe_sets_the_best_lr_and_restores_the_model(tmp_path, data):
    lit = LitClassifier(net="fresh", scheduler="cosine")
    before, probe, spy = Spy(), QatLrProbe(lrs=(1e-6, 0.05), steps=8, eval_batches=2), Spy()
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=2),
        QuantizationAwareTraining(),
        before,
        probe,
        spy,
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(lit, datamodule=data)
    result = probe.result
    assert [r.lr for r in result.rows] == [1e-6, 0.05]
    assert result.best_lr == 0.05 and result.rows[1].metric < result.rows[0].metric  # a fresh net learns
    assert spy.lr == pytest.approx(0.05) and spy.base_lrs == [pytest.approx(0.05)]
    assert spy.opt_state == 0  # momentum buffers of the probe are gone
    for k, v in before.params.items():  # the probe's steps left no trace
        assert torch.equal(v, spy.params[k]), k


def test_probe_rejects_bad_options():
    with pytest.raises(ValueError, match="positive"):
        QatLrProbe(lrs=(0.0,))
    with pytest.raises(ValueError, match=">= 1"):
        QatLrProbe(steps=0)


class LrRecorder(Callback):
    def __init__(self):
        self.lrs = {}

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def _probe_fit(tmp_path, data, ckpt_path=None):
    torch.manual_seed(0)
    probe, rec = QatLrProbe(lrs=(1e-6, 0.05), steps=4, eval_batches=2), LrRecorder()
    callbacks = [PrepareQuantization(), Calibration(num_batches=2), QuantizationAwareTraining(), probe, rec]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}"))
    trainer = make_trainer(
        tmp_path, callbacks, max_epochs=3, limit_train_batches=3, limit_val_batches=2,
        enable_checkpointing=ckpt_path is None, version=int(ckpt_path is not None),
    )  # fmt: skip
    trainer.fit(LitClassifier(net="fresh", scheduler="cosine"), datamodule=data, ckpt_path=ckpt_path)
    return probe, rec.lrs


def test_a_resumed_fit_keeps_the_probed_lr_and_the_restored_schedule(tmp_path, data):
    probe, full = _probe_fit(tmp_path, data)
    assert probe.result.best_lr == 0.05 and full[0] == pytest.approx(0.05)  # the probe chose, not the 0.01
    resumed_probe, resumed = _probe_fit(tmp_path, data, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert sorted(resumed) == [3, 4, 5, 6, 7, 8]
    for step, lr in resumed.items():  # the cosine decay goes on from the checkpoint, as if uninterrupted
        assert lr == pytest.approx(full[step], rel=1e-9), step
    assert resumed_probe.result == probe.result  # the decision (and the table) comes from the checkpoint
