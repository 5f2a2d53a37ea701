"""Bad ``trainer.*`` values and a ``callbacks.prepare.chip`` against ``chip=``: exit 2 naming the key, no run.

``lightning.Trainer`` refuses some values only when it is built (``devices=0``, ``precision=17``, an unknown
accelerator); the preflight builds it from ``trainer.*`` before anything is written or run and reports the
refusal as a config problem naming ``trainer.<key>``. A ``callbacks.prepare.chip`` that contradicts
``chip=`` is refused when the config is checked (before Hydra starts the run).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat_lightning.app.config_checks import ConfigError
from qat_lightning.cli import compose, to_app_config
from tests.app.helpers import run_app
from tests.test_cli import cli

BAD_TRAINER = [
    ("trainer.devices=0", "trainer.devices=0"),
    ("trainer.precision=17", "trainer.precision=17"),
    ("trainer.accelerator=tpuu", "trainer.accelerator='tpuu'"),
]
FAST_FLOAT = ["stage=float", "train.max_steps=2", "progress=false", "logger=none"]
HYDRA_FILES = {".hydra", "qat_lightning.log"}
"""What Hydra itself writes into the run dir before the job starts (not run outputs)."""


def _run_outputs(run_dir: Path) -> set[str]:
    """The names in ``run_dir`` other than Hydra's own files (empty: nothing was run or written)."""
    return {p.name for p in run_dir.iterdir()} - HYDRA_FILES if run_dir.exists() else set()


@pytest.mark.parametrize(("override", "key"), BAD_TRAINER)
def test_bad_trainer_value_is_a_config_problem_before_anything_runs(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        run_app(tmp_path, *FAST_FLOAT, override)
    assert key in str(err.value)
    assert "lightning.Trainer" in str(err.value)
    assert _run_outputs(tmp_path) == set()


@pytest.mark.parametrize(("override", "key"), BAD_TRAINER)
def test_cli_exits_2_naming_the_trainer_key(tmp_path, override, key):
    result = cli(*FAST_FLOAT, override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "qat-lightning: error:" in result.stderr and key in result.stderr
    assert "Traceback" not in result.stderr
    assert _run_outputs(tmp_path) == set()


def test_trainer_problems_names_every_key_that_alone_fixes_it():
    from qat_lightning.app.trainer_args import trainer_problems

    base = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
    assert trainer_problems(base, progress=False) == []
    (line,) = trainer_problems({**base, "devices": 0}, progress=False)
    assert line.startswith("trainer.devices=0: lightning.Trainer refuses")
    assert "`Trainer(devices=0)`" in line  # Lightning's own message is quoted


def test_trainer_problem_without_a_single_culprit_quotes_lightning(monkeypatch):
    import lightning

    from qat_lightning.app.trainer_args import trainer_problems

    class Refusing:
        def __init__(self, **_kw):
            raise ValueError("refused whatever you pass")

    monkeypatch.setattr(lightning, "Trainer", Refusing)
    (line,) = trainer_problems({"accelerator": "cpu"}, progress=False)
    assert line.startswith("trainer (accelerator='cpu'): lightning.Trainer refuses")
    assert "refused whatever you pass" in line


CHIP_CONFLICT = ["chip=j6m", "+callbacks.prepare.chip=j6p"]


@pytest.mark.parametrize("stage", ["calibration", "qat", "pipeline", "troubleshoot"])
def test_callback_chip_contradicting_chip_is_refused(stage):
    with pytest.raises(ConfigError) as err:
        to_app_config(compose([f"stage={stage}", *CHIP_CONFLICT]))
    text = str(err.value)
    assert "callbacks.prepare.chip='j6p'" in text and "chip=j6m" in text


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage=calibration", "chip=j6p", "+callbacks.prepare.chip=j6p"],  # agrees: harmless
        ["stage=calibration", "chip=j6p", "+callbacks.prepare.chip=J6P"],  # chip names are case-insensitive
        ["stage=calibration", "+callbacks.prepare.chip=null"],
        ["stage=float", *CHIP_CONFLICT],  # builds no prepare callback: only warned (ignored override)
    ],
)
def test_callback_chip_that_does_not_contradict_composes(overrides):
    to_app_config(compose(overrides))


def test_unknown_callback_chip_lists_the_chips():
    with pytest.raises(ConfigError, match=r"callbacks.prepare.chip='j7'.*known chips: j6e, j6m, j6p"):
        to_app_config(compose(["stage=calibration", "+callbacks.prepare.chip=j7"]))


def test_cli_refuses_the_chip_contradiction_before_the_run(tmp_path):
    ckpt = tmp_path / "float.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    run_dir = tmp_path / "run"
    result = cli(
        "stage=calibration", *CHIP_CONFLICT, f"ckpt={ckpt}", "progress=false", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "callbacks.prepare.chip='j6p'" in result.stderr and "chip=j6m" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # refused before Hydra starts the run
