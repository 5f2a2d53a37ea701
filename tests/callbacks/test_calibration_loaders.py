"""Calibration over several loaders of a split: a list / dict of loaders or a CombinedLoader, chained."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import LitClassifier, make_loader, make_trainer, scales
from lightning.pytorch.utilities import CombinedLoader

from qat_lightning.callbacks import Calibration, PrepareQuantization, calibrate


class _NoHooks(LitClassifier):
    """Data come only from ``fit()``; ``validation_step`` takes a loader index (several val loaders)."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return super().validation_step(batch, batch_idx)


def _reference_scales(trainer, batches, num_batches=None):
    """The scales of a plain-torch calibration of a fresh prepared network over ``batches``."""
    reference = LitClassifier()
    PrepareQuantization().setup(trainer, reference, "fit")
    calibrate(reference.model, batches, num_batches=num_batches)
    return scales(reference.model)


def _assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("num_batches", [None, 6])
def test_several_val_loaders_are_chained_in_order(tmp_path, num_batches):
    first, second = make_loader(128, 1), make_loader(128, 2, scale=3.0)  # 4 + 4 batches, wider second
    calib = Calibration(num_batches=num_batches, dataloader="val")
    trainer = make_trainer(tmp_path, [PrepareQuantization(), calib], max_epochs=0)
    with pytest.warns(UserWarning, match=f"only {num_batches or 8} batch"):
        trainer.fit(_NoHooks(), make_loader(256, 0), [first, second])
    assert calib.batches_used == (num_batches or 8)  # num_batches counts across both loaders
    chained = [*first, *second]
    _assert_same(scales(trainer.lightning_module.model), _reference_scales(trainer, chained, num_batches))


def test_a_combined_train_loader_is_unwrapped_and_chained(tmp_path):
    loaders = {"a": make_loader(256, 0), "b": make_loader(128, 2, scale=3.0)}  # 8 + 4 batches
    calib = Calibration(num_batches=None)
    trainer = make_trainer(tmp_path, [PrepareQuantization(), calib], max_epochs=0)
    trainer.fit(_NoHooks(), CombinedLoader(loaders, "max_size_cycle"))
    assert calib.batches_used == 12
    chained = [*make_loader(256, 0), *make_loader(128, 2, scale=3.0)]
    _assert_same(scales(trainer.lightning_module.model), _reference_scales(trainer, chained))


def test_a_single_loader_is_used_as_is(tmp_path):
    loader = make_loader(256, 0)
    calib = Calibration(num_batches=None)
    trainer = make_trainer(tmp_path, [PrepareQuantization(), calib], max_epochs=0)
    trainer.fit(_NoHooks(), loader)
    assert calib.batches_used == 8
    _assert_same(scales(trainer.lightning_module.model), _reference_scales(trainer, make_loader(256, 0)))
