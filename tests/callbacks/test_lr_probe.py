"""QatLrProbe: fixed-LR fine-tunes at train start, states restored, best LR on optimizer + scheduler."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import LitClassifier, make_trainer, scales
from lightning.pytorch import Callback

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
