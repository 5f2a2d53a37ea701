"""The built-in example: load_digits data module and the CNN + attention + wide-range-feature model."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from qat_lightning.example import INK_MAX, PIXEL_MAX, DigitsClassifier, DigitsDataModule, DigitsNet


def test_datamodule_split_is_stratified_and_in_physical_units():
    dm = DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert 355 <= len(dm.val_set) <= 365
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    images = dm.train_set.tensors[0]
    assert float(images.min()) == 0.0 and float(images.max()) == PIXEL_MAX
    val_labels = dm.val_set.tensors[1]
    assert torch.bincount(val_labels, minlength=10).min() >= 30  # every class held out
    again = DigitsDataModule(batch_size=32, seed=0)
    again.setup()
    assert torch.equal(again.val_set.tensors[1], val_labels)  # deterministic split


def test_datamodule_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)


def test_model_has_the_op_families_and_a_wide_range_feature():
    net = DigitsNet().eval()
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "LayerNorm", "Linear"} <= kinds
    dm = DigitsDataModule()
    dm.setup()
    x = dm.val_set.tensors[0][:64]
    assert net(x).shape == (64, 10)
    ink = x.sum(dim=(2, 3))
    assert float(ink.max()) > 10 * 16 and float(ink.max()) <= INK_MAX  # far beyond int8-friendly ranges


def test_short_training_learns(tmp_path):
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = DigitsClassifier()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    acc = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/acc"]
    assert acc > 0.8


def test_int8_on_the_concat_loses_accuracy_for_a_real_reason(tmp_path):
    """One per-tensor int8 scale for [features ~1, ink ~300] rounds the features away; int16 keeps them."""
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = DigitsClassifier()
    trainer = L.Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    net = model.model.eval()
    x, y = dm.val_set.tensors
    captured = {}
    net.head.register_forward_pre_hook(lambda m, args: (captured.setdefault("z", args[0].detach()), None)[1])
    with torch.no_grad():
        float_acc = (net(x).argmax(1) == y).float().mean()
    z = captured["z"]

    def accuracy(bits: int) -> float:
        qmax = 2 ** (bits - 1) - 1
        scale = z.abs().max() / qmax
        zq = torch.clamp(torch.round(z / scale), -qmax - 1, qmax) * scale
        return float((net.head(zq).argmax(1) == y).float().mean())

    assert accuracy(16) == pytest.approx(float(float_acc), abs=0.003)
    assert accuracy(8) < float(float_acc) - 0.02
