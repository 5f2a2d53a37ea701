"""An override of a callback or section the chosen stage does not run is warned about; one it runs is not.

The warning follows what the stage runs with the composed config (``stage=calibration recipe=int8`` runs no
analysis, ``stage=qat sanity=none`` no sanity check), ``+`` additions included; without the config it
follows what the stage can run at all. The callbacks each stage builds are checked against real runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qat_lightning.app.config_checks import ignored_overrides
from qat_lightning.app.schema import StageName
from qat_lightning.cli import compose, to_app_config
from tests.app.helpers import run_app
from tests.test_cli import cli

ANALYSIS_CB = ["callbacks.analysis.num_steps=3", "+callbacks.analysis.dirname=qa_x"]
SANITY_CB = ["callbacks.sanity.tolerance=0.5"]
QAT_CB = ["callbacks.qat.submodule=model"]
CALIBRATION_CB = ["callbacks.calibration.num_batches=2"]
PREPARE_CB = ["callbacks.prepare.int_bias=false", "+callbacks.prepare.chip=j6m"]
EVERY_CB = [*ANALYSIS_CB, *SANITY_CB, *QAT_CB, *CALIBRATION_CB, *PREPARE_CB]

# stage, the config it runs with, overrides it ignores, overrides it reads
CASES = [
    ("float", [], [*EVERY_CB, "qat.lr=0.5"], ["train.max_steps=3"]),
    (
        "calibration",
        ["recipe=int8"],
        [*ANALYSIS_CB, *SANITY_CB, *QAT_CB, "analysis.num_steps=3", "search.eval_batches=2"],
        [*CALIBRATION_CB, *PREPARE_CB, "calibration.num_batches=2", "sanity.mode=none"],
    ),
    (
        "calibration",  # a mixed recipe analyses the base model for its int16 search
        ["recipe=int8_int16"],
        [*SANITY_CB, *QAT_CB, "sanity.tolerance=0.5"],
        [*ANALYSIS_CB, *CALIBRATION_CB, *PREPARE_CB, "analysis.num_steps=3", "search.eval_batches=2"],
    ),
    (
        "calibration",  # sanity=float checks the calibrated model with sanity.tolerance
        ["sanity.mode=float"],
        [*SANITY_CB, "sanity.steps=3"],
        ["sanity.tolerance=0.5"],
    ),
    (
        "qat",  # sanity=none (the default): no sanity check
        [],
        [*ANALYSIS_CB, *SANITY_CB, "sanity.steps=3", "calibration.num_batches=2"],
        [*QAT_CB, *PREPARE_CB, *CALIBRATION_CB, "qat.lr=0.5"],
    ),
    ("qat", ["sanity=lr0"], ANALYSIS_CB, [*SANITY_CB, *QAT_CB, "sanity.steps=3"]),
    (
        "analysis",
        [],
        [*SANITY_CB, *QAT_CB, *CALIBRATION_CB, *PREPARE_CB, "qat.lr=0.5"],
        [*ANALYSIS_CB, "analysis.num_steps=3"],
    ),
    ("export", [], EVERY_CB, ["export.opset=20"]),
    (
        "troubleshoot",
        ["recipe=int8"],
        [*ANALYSIS_CB, "analysis.num_steps=3"],
        [*SANITY_CB, *QAT_CB, *CALIBRATION_CB, *PREPARE_CB, "sanity.steps=3"],
    ),
    ("pipeline", [], ["sanity=lr0"], [*EVERY_CB, "sanity.steps=3", "export.opset=20"]),
    ("pipeline", ["pipeline.sanity=false"], [*SANITY_CB, "sanity.steps=3"], [*QAT_CB, *ANALYSIS_CB]),
    ("pipeline", ["export.enabled=false"], ["export.opset=20"], EVERY_CB),
]


def _warned(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[0] for line in lines]


@pytest.mark.parametrize(("stage", "config", "ignored", "read"), CASES)
def test_overrides_of_what_the_stage_does_not_run_are_warned(stage, config, ignored, read):
    overrides = [f"stage={stage}", *config, *ignored, *read]
    cfg = to_app_config(compose(overrides))
    assert _warned(ignored_overrides(StageName(stage), overrides, cfg)) == ignored


@pytest.mark.parametrize(
    ("stage", "never_built"),
    [
        ("float", EVERY_CB),
        ("calibration", [*SANITY_CB, *QAT_CB]),
        ("analysis", [*SANITY_CB, *QAT_CB, *CALIBRATION_CB, *PREPARE_CB]),
        ("export", EVERY_CB),
    ],
)
def test_callbacks_a_stage_never_builds_are_warned_without_the_config(stage, never_built):
    assert _warned(ignored_overrides(StageName(stage), never_built)) == never_built


def test_the_reason_is_named():
    overrides = ["stage=calibration", "recipe=int8", "callbacks.analysis.num_steps=3"]
    (line,) = ignored_overrides(StageName.calibration, overrides, to_app_config(compose(overrides)))
    assert line.startswith("callbacks.analysis.num_steps=3: stage=calibration does not read")
    assert "recipe=int8" in line


def test_cli_warns_about_a_callback_the_stage_never_builds():
    result = cli("--cfg", "job", "stage=calibration", *SANITY_CB)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: ignored override callbacks.sanity.tolerance=0.5: stage=calibration" in result.stderr


def test_cli_warns_about_an_analysis_callback_override_of_an_untuned_recipe():
    result = cli("--cfg", "job", "stage=calibration", "recipe=int8", ANALYSIS_CB[0])
    assert "warning: ignored override callbacks.analysis.num_steps=3" in result.stderr
    tuned = cli("--cfg", "job", "stage=calibration", "recipe=int8_int16", ANALYSIS_CB[0])
    assert "ignored override callbacks.analysis" not in tuned.stderr


# ------------------------------------------------------------------------------------ what the stages build
RUN_FAST = [
    "progress=false",
    "logger=none",
    "train.max_steps=2",
    "train.limit_val_batches=1",
    "calibration.num_batches=1",
    "qat.max_steps=1",
    "sanity.steps=1",
    "analysis.num_steps=1",
    "search.eval_batches=1",
    "export.check_batches=0",
]


@pytest.fixture()
def built(monkeypatch) -> list[str]:
    """The ``callbacks.<name>`` each run builds (``Session.callback``), in order."""
    from qat_lightning.app.session import Session

    names: list[str] = []
    original = Session.callback

    def recording(self, name: str, **runtime):
        names.append(name)
        return original(self, name, **runtime)

    monkeypatch.setattr(Session, "callback", recording)
    return names


def _run(run_dir: Path, built: list[str], stage: str, *overrides: str) -> set[str]:
    from qat_lightning.app.stage_reads import stage_callbacks

    built.clear()
    all_overrides = [*RUN_FAST, f"stage={stage}", *overrides]
    run_app(run_dir, *all_overrides)
    expected = set(stage_callbacks(StageName(stage), to_app_config(compose(all_overrides))))
    assert set(built) == expected, (stage, overrides)
    return expected


def test_the_stages_build_the_callbacks_the_warning_assumes(tmp_path, built):
    _run(tmp_path / "float", built, "float")
    float_ckpt = tmp_path / "float" / "checkpoints" / "float.ckpt"
    assert _run(tmp_path / "calib", built, "calibration", "recipe=int8", f"ckpt={float_ckpt}") == {
        "prepare",
        "calibration",
    }
    tuned = ("recipe=int8_int16", "recipe.int16_ratio=0.2", f"ckpt={float_ckpt}")
    assert "analysis" in _run(tmp_path / "tuned", built, "calibration", *tuned)
    calib = tmp_path / "calib" / "checkpoints" / "calibration.ckpt"
    assert "sanity" not in _run(tmp_path / "qat", built, "qat", f"ckpt={calib}")
    assert "sanity" in _run(tmp_path / "qat_lr0", built, "qat", "sanity=lr0", f"ckpt={calib}")
    assert _run(tmp_path / "analysis", built, "analysis", f"ckpt={calib}") == {"analysis"}
    assert _run(tmp_path / "export", built, "export", f"ckpt={calib}") == set()
    _run(tmp_path / "troubleshoot", built, "troubleshoot", "recipe=int8", f"ckpt={float_ckpt}")
