"""qat_lightning.app.trainer_args: trainer keys a stage sets are refused; max_steps > 0 wins over epochs."""

from __future__ import annotations

import pytest
import torch

from qat_lightning.app.config_checks import ConfigError
from qat_lightning.app.trainer_args import run_length
from qat_lightning.cli import compose, to_app_config
from tests.app.helpers import FAST, calibration_checkpoint, run_app


@pytest.mark.parametrize(
    ("override", "instead"),
    [
        ("+trainer.max_steps=3", "train.max_steps"),
        ("+trainer.max_epochs=1", "qat.max_epochs"),
        ("+trainer.limit_train_batches=2", "train.limit_train_batches"),
        ("+trainer.limit_val_batches=2", "train.limit_val_batches"),
        ("+trainer.callbacks=[]", "callbacks.<name>"),
        ("+trainer.logger=false", "logger="),
        ("+trainer.default_root_dir=/tmp/x", "hydra.run.dir"),
        ("+trainer.enable_checkpointing=true", "the stages save checkpoints"),
        ("+trainer.enable_progress_bar=true", "progress=true|false"),
        ("+trainer.num_sanity_val_steps=2", "the stages validate themselves"),
    ],
)
def test_trainer_key_a_stage_sets_is_refused_before_anything_runs(tmp_path, override, instead):
    key = override.split("=")[0].lstrip("+")
    with pytest.raises(ConfigError, match=rf"{key}=.*the stages set .* themselves.*{instead}"):
        run_app(tmp_path, "stage=float", override)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override",
    [
        "+trainer.enable_checkpointing=false",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.enable_progress_bar=false",
    ],
)
def test_trainer_key_equal_to_what_the_stages_set_is_accepted(override):
    to_app_config(compose([*FAST, "stage=float", override]))  # FAST: progress=false


def test_run_length_max_steps_wins():
    assert run_length(2, 100) == {"max_epochs": -1, "max_steps": 100}
    assert run_length(2, -1) == {"max_epochs": 2, "max_steps": -1}


def test_max_steps_is_not_cut_by_max_epochs(tmp_path):
    steps = 30  # more than one epoch (about 12 steps of 128 samples)
    calib = calibration_checkpoint(tmp_path, (f"train.max_steps={steps}", "train.max_epochs=1"))
    float_ckpt = torch.load(tmp_path / "float" / "checkpoints" / "float.ckpt", weights_only=False)
    assert float_ckpt["global_step"] == steps
    run_app(tmp_path / "qat", "stage=qat", f"qat.max_steps={steps}", "qat.max_epochs=1", f"ckpt={calib}")
    qat = torch.load(tmp_path / "qat" / "checkpoints" / "qat.ckpt", weights_only=False)
    assert qat["global_step"] == steps
