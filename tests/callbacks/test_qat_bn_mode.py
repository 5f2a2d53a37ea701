"""QuantizationAwareTraining(bn_mode=...) against the qat_mode the network was prepared with."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import make_trainer

from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining
from qat_lightning.quant.qat import BN_TYPES


def _running_means(model) -> dict[str, torch.Tensor]:
    return {name: m.running_mean.clone() for name, m in model.named_modules() if isinstance(m, BN_TYPES)}


@pytest.mark.parametrize(
    ("prepared", "requested"),
    [("fuse_bn", "with_bn"), ("with_bn", "fuse_bn"), ("freeze_bn", "with_bn"), ("freeze_bn", "fuse_bn")],
)
def test_a_structural_bn_mode_other_than_the_prepared_one_is_refused(
    tmp_path, lit, data, prepared, requested
):
    callbacks = [
        PrepareQuantization(qat_mode=prepared),
        Calibration(10),
        QuantizationAwareTraining(bn_mode=requested),
    ]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=3)
    with pytest.raises(
        ValueError,
        match=rf"bn_mode='{requested}' needs a model prepared with qat_mode='{requested}', but it was "
        rf"prepared with qat_mode='{prepared}'; set PrepareQuantization\(qat_mode='{requested}'\)",
    ):
        trainer.fit(lit, datamodule=data)
    assert trainer.global_step == 0  # refused at fit start, before any training step


@pytest.mark.parametrize(
    ("prepared", "requested", "bn_trains"),
    [
        ("fuse_bn", "fuse_bn", True),
        ("with_bn", "with_bn", True),
        ("freeze_bn", "freeze_bn", False),
        ("fuse_bn", "freeze_bn", False),  # freezing fits every prepared mode
        ("with_bn", "freeze_bn", False),
        ("freeze_bn", None, False),  # None: as prepared
    ],
)
def test_matching_or_freezing_bn_modes_are_accepted(tmp_path, lit, data, prepared, requested, bn_trains):
    callbacks = [
        PrepareQuantization(qat_mode=prepared),
        Calibration(10),
        QuantizationAwareTraining(bn_mode=requested),
    ]
    make_trainer(tmp_path, callbacks, max_epochs=0).fit(lit, datamodule=data)
    before = _running_means(lit.model)
    assert before
    make_trainer(tmp_path, callbacks, limit_train_batches=3, version=1).fit(lit, datamodule=data)
    after = _running_means(lit.model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == (list(before) if bn_trains else [])
