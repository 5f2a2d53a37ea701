"""qat_lightning.app.preflight: a user's mistake is a clean error before any training."""

from __future__ import annotations

import pytest
import torch

from qat_lightning.app.checkpoints import APP_KEY
from qat_lightning.app.config_checks import ConfigError
from qat_lightning.app.preflight import checkpoint_problems
from qat_lightning.app.recipes import Recipe
from qat_lightning.app.schema import BnMode, PrepareConf, PrepareMethod
from tests.app.helpers import run_app
from tests.test_cli import cli


def _fake_ckpt(path, kind, chip="j6m"):
    recipe = None if kind == "float" else Recipe(name="int8", chip=chip).to_dict()
    torch.save({"state_dict": {}, APP_KEY: {"kind": kind, "recipe": recipe}}, path)
    return path


def _nothing_trained(run_dir):
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "summary.md").exists()


def test_missing_submodule_names_the_modules_there(tmp_path):
    with pytest.raises(ConfigError, match=r"prepare.submodule='nonexistent': .* its submodules: model"):
        run_app(tmp_path, "stage=float", "prepare.submodule=nonexistent")
    _nothing_trained(tmp_path)


def test_wrong_target_metric_lists_the_logged_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"target.metric='val/accuracy' is not logged .* logged: .*val/acc"):
        run_app(tmp_path, "stage=float", "target.metric=val/accuracy")
    _nothing_trained(tmp_path)


@pytest.mark.parametrize(
    ("stage", "kind", "expected"),
    [
        ("qat", "float", "a float checkpoint; stage=qat needs a calibration checkpoint"),
        ("analysis", "float", "a float checkpoint; stage=analysis needs a calibration checkpoint"),
        ("calibration", "calibration", "calibration checkpoint; stage=calibration needs a float checkpoint"),
    ],
)
def test_wrong_kind_of_checkpoint(tmp_path, stage, kind, expected):
    ckpt = _fake_ckpt(tmp_path / "given.ckpt", kind)
    with pytest.raises(ConfigError, match=expected):
        run_app(tmp_path / "run", f"stage={stage}", f"ckpt={ckpt}")
    _nothing_trained(tmp_path / "run")


def test_not_a_checkpoint(tmp_path):
    ckpt = tmp_path / "notes.ckpt"
    ckpt.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read as a checkpoint"):
        run_app(tmp_path / "run", "stage=qat", f"ckpt={ckpt}")


def test_checkpoint_of_another_chip_is_refused(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "calibration.ckpt", "calibration", chip="j6p")
    with pytest.raises(ConfigError, match="for chip=j6p, this run targets chip=j6m; pass chip=j6p"):
        run_app(tmp_path / "run", "stage=qat", "chip=j6m", f"ckpt={ckpt}")
    _nothing_trained(tmp_path / "run")


def test_checkpoint_prepared_otherwise_is_refused(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "calibration.ckpt", "calibration")
    state = torch.load(ckpt, weights_only=False)
    prepare = {"submodule": "model", "method": "eager", "qat_mode": "with_bn", "chip": None}
    torch.save({**state, "callbacks": {"PrepareQuantization{'submodule': 'model'}": prepare}}, ckpt)
    with pytest.raises(
        ConfigError,
        match=r"made with PrepareQuantization\(qat_mode='with_bn', method='eager'\) but this run has "
        r"qat_mode='fuse_bn', method='auto'; pass prepare\.qat_mode=with_bn prepare\.method=eager",
    ):
        run_app(tmp_path / "run", "stage=analysis", f"ckpt={ckpt}")
    _nothing_trained(tmp_path / "run")
    same = PrepareConf(method=PrepareMethod.eager, qat_mode=BnMode.with_bn)
    assert checkpoint_problems(ckpt, "calibration", "j6m", "analysis", same) == []


def test_cli_exits_2_before_training(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "calibration.ckpt", "calibration", chip="j6p")
    result = cli("stage=analysis", f"ckpt={ckpt}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "calibrated for chip=j6p" in result.stderr and "Traceback" not in result.stderr
