"""Equalization / AdaRound / BiasCorrection callbacks through a real Trainer; conf/ptq YAMLs build them."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra import initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

import qat_lightning as ql
from qat_lightning.callbacks import AdaRound, BiasCorrection, Calibration, Equalization, PrepareQuantization
from qat_lightning.cli import CONFIG_DIR, compose, make_factories, register_schema
from qat_lightning.ptq import PTQ_CHECKPOINT_KEY, float_reference, original_float_parameters
from tests.models import TinyEncoder

PTQ_CHOICES = sorted(p.stem for p in (Path(CONFIG_DIR) / "ptq").glob("*.yaml"))


class _Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyEncoder(dim=8, hidden=16, depth=1)
        with torch.no_grad():
            self.model.layers[0].norm1.weight[0] = 15.0  # an outlier channel for SmoothQuant to move

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.model(x)

    def training_step(self, batch, _idx):  # noqa: D102
        return F.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, _idx):  # noqa: D102
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):  # noqa: D102
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, 8, generator=g)
        return DataLoader(TensorDataset(x, torch.randn(64, 4, 8, generator=g)), batch_size=16)

    val_dataloader = train_dataloader


def _trainer(tmp_path: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks,
        max_epochs=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=2,
    )


def test_callbacks_run_in_order_on_a_real_trainer(tmp_path: Path) -> None:
    lit = _Lit()
    reference = copy.deepcopy(lit.model).eval()
    x = next(iter(lit.train_dataloader()))[0]
    eq, ada, bc = (
        Equalization(num_batches=2),
        AdaRound(num_batches=2, iterations=10),
        BiasCorrection(num_batches=2),
    )
    trainer = _trainer(tmp_path, [eq, PrepareQuantization(), Calibration(num_batches=4), ada, bc])
    trainer.validate(lit, verbose=False)
    assert {g.kind for g in eq.result.groups if g.applied} >= {"layernorm"}
    assert ada.applied and bc.applied and ada.result.rows and bc.result.rows
    assert {r.name for r in ada.result.rows} == {r.name for r in bc.result.rows}
    with ql.fake_quant_state(lit.model, ql.FakeQuantState.FLOAT):  # the AdaRound weights moved, slightly
        assert torch.allclose(lit.model.eval()(x), reference(x), atol=0.2)
        with float_reference(
            lit.model
        ):  # ... and their float values are recorded (equalization: same function)
            assert torch.allclose(lit.model.eval()(x), reference(x), atol=1e-4)
    assert ada.state_dict() == {"applied": True}
    again = _trainer(tmp_path, [PrepareQuantization(), Calibration(num_batches=4), ada])
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    again.validate(lit, verbose=False)  # runs once: a second pass changes nothing
    assert all(torch.equal(v, before[k]) for k, v in lit.state_dict().items())


def test_float_records_travel_in_the_checkpoint(tmp_path: Path) -> None:
    """The values AdaRound / BiasCorrection overwrote are saved in the checkpoint and attached on restore."""
    lit = _Lit()
    reference = copy.deepcopy(lit.model).eval()
    x = next(iter(lit.train_dataloader()))[0]

    def callbacks() -> list:
        return [
            PrepareQuantization(),
            Calibration(num_batches=4),
            AdaRound(num_batches=2, iterations=10),
            BiasCorrection(num_batches=2),
        ]

    trainer = _trainer(tmp_path, callbacks())
    trainer.validate(lit, verbose=False)
    recorded = original_float_parameters(lit.model)
    assert any(k.endswith(".weight") for k in recorded) and any(k.endswith(".bias") for k in recorded)
    path = tmp_path / "ptq.ckpt"
    trainer.save_checkpoint(str(path))
    saved = torch.load(str(path), map_location="cpu", weights_only=True)[PTQ_CHECKPOINT_KEY]["model"]
    assert set(saved) == set(recorded)
    restored = _Lit()
    again = callbacks()
    _trainer(tmp_path, again).validate(restored, ckpt_path=str(path), verbose=False)
    assert again[2].applied and again[3].applied and again[2].result is None  # restored, not run again
    assert {k: v.shape for k, v in original_float_parameters(restored.model).items()} == {
        k: v.shape for k, v in recorded.items()
    }
    model = restored.model.eval()
    with torch.no_grad(), ql.fake_quant_state(model, ql.FakeQuantState.FLOAT), float_reference(model):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_wrong_order_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not calibrated; put Calibration before BiasCorrection"):
        _trainer(tmp_path, [PrepareQuantization(), BiasCorrection(), Calibration()]).validate(
            _Lit(), verbose=False
        )
    with pytest.raises(ValueError, match="before PrepareQuantization"):
        _trainer(tmp_path, [PrepareQuantization(), Equalization()]).validate(_Lit(), verbose=False)
    with pytest.raises(ValueError, match="allowed"):
        Equalization(kinds=["smooth"])
    with pytest.raises(ValueError, match="num_batches"):
        AdaRound(num_batches=0)


@pytest.mark.parametrize("choice", PTQ_CHOICES)
def test_every_ptq_yaml_instantiates(choice: str) -> None:
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose([f"ptq={choice}"])
    equalization, after = make_factories(cfg).ptq()
    assert cfg.ptq.name == choice
    assert (equalization is None) == (cfg.ptq.equalization is None)
    assert equalization is None or isinstance(equalization, Equalization)
    assert [type(c).__name__ for c in after] == [
        c["_target_"].rsplit(".", 1)[1] for c in cfg.ptq.after_calibration
    ]
    assert set(PTQ_CHOICES) >= {"none", "equalize", "bias_correction", "adaround", "all"}
