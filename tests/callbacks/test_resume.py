"""A QAT run killed mid-training and resumed with ckpt_path ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import Crash, LitClassifier, TinyData, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import qat_lightning as ql
from qat_lightning.callbacks import (
    Calibration,
    PrepareQuantization,
    QuantizationAwareTraining,
    QuantStatsMonitor,
)


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
