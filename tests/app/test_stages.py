"""Single stages: float -> calibration -> qat (ckpt=...), analysis, chip rule errors, missing checkpoints."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from qat_lightning.app.config_checks import ConfigError
from qat_lightning.app.recipes import RecipeError
from qat_lightning.files import default_file_mode
from tests.app.helpers import run_app


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("float")
    summary = run_app(run_dir, "stage=float")
    return run_dir, summary


def test_float_stage(float_run):
    run_dir, summary = float_run
    assert (run_dir / "checkpoints" / "float.ckpt").is_file()
    assert [row.step for row in summary.rows] == ["float"]
    assert "| float | float |" in (run_dir / "summary.md").read_text()
    assert list(run_dir.glob("events.out.tfevents.*"))


def test_calibration_then_qat_with_ckpt(float_run, tmp_path):
    float_dir, _ = float_run
    calib_dir, qat_dir = tmp_path / "calib", tmp_path / "qat"
    summary = run_app(
        calib_dir,
        "stage=calibration",
        "recipe=int16",
        "calibration=kl",
        "sanity=float",
        f"ckpt={float_dir / 'checkpoints' / 'float.ckpt'}",
    )
    (row,) = summary.rows
    assert row.recipe == "int16" and row.int16_ratio == pytest.approx(1.0)
    assert (calib_dir / "model_check_result.txt").is_file()
    assert "Sanity check (float, after calibration): PASS" in (calib_dir / "sanity_check.txt").read_text()
    ckpt = calib_dir / "checkpoints" / "calibration.ckpt"
    recorded = torch.load(ckpt, weights_only=False)["qat_lightning"]
    assert recorded["kind"] == "calibration" and recorded["recipe"]["observer"] == "kl"
    # the QAT stage rebuilds the recipe from the checkpoint (recipe=int8 on the command line is not used)
    summary = run_app(qat_dir, "stage=qat", "recipe=int8", "sanity=lr0", f"ckpt={ckpt}")
    steps = [r.step for r in summary.rows]
    assert steps == ["qat", "sanity lr0"]
    assert summary.rows[0].recipe == "int16" and summary.rows[0].int16_ratio == pytest.approx(1.0)
    assert (qat_dir / "checkpoints" / "qat.ckpt").is_file()
    # the reloaded model trained in train mode: every BatchNorm (qat_mode fuse_bn) updated its statistics
    calib_state = torch.load(ckpt, weights_only=False)["state_dict"]
    qat_state = torch.load(qat_dir / "checkpoints" / "qat.ckpt", weights_only=False)["state_dict"]
    means = [k for k in calib_state if k.endswith("running_mean")]
    assert means and all(not torch.equal(calib_state[k], qat_state[k]) for k in means)
    assert "Sanity check (lr0)" in next(qat_dir.glob("*sanity_lr0/sanity_check.txt")).read_text()
    reports = [
        calib_dir / "summary.md",
        calib_dir / "sanity_check.txt",
        calib_dir / "model_check_result.txt",
        qat_dir / "summary.md",
        next(qat_dir.glob("*sanity_lr0/sanity_check.txt")),
    ]
    modes = {path.name: stat.S_IMODE(os.stat(path).st_mode) for path in reports}
    assert set(modes.values()) == {default_file_mode()}, modes  # as open(path, "w") would: 0644 under 022


def test_qat_refuses_a_checkpoint_calibrated_with_another_qat_mode(float_run, tmp_path):
    float_dir, _ = float_run
    calib_dir, qat_dir = tmp_path / "calib", tmp_path / "qat"
    run_app(
        calib_dir,
        "stage=calibration",
        "recipe=int8",
        "prepare.qat_mode=with_bn",
        f"ckpt={float_dir / 'checkpoints' / 'float.ckpt'}",
    )
    ckpt = calib_dir / "checkpoints" / "calibration.ckpt"
    # its scales were measured on the raw conv weights: reloading it as fuse_bn (the default) is refused
    with pytest.raises(
        ConfigError,
        match=r"(?s)stage=qat cannot start .*calibration\.ckpt was made with "
        r"PrepareQuantization\(qat_mode='with_bn'\) but this run has qat_mode='fuse_bn'; "
        r"pass prepare\.qat_mode=with_bn",
    ):
        run_app(qat_dir, "stage=qat", f"ckpt={ckpt}")
    assert not (qat_dir / "checkpoints").exists()


def test_summary_lists_only_files_that_exist(float_run):
    run_dir, _ = float_run
    files = (run_dir / "summary.md").read_text().split("## Files", 1)[1]
    assert "`checkpoints/`" in files and "`summary.md`" in files and "`events.out.tfevents.*`" in files
    for absent in ("sanity_check.txt", "troubleshoot.md", "quant_analysis/", "lr_probe.md", "model_check"):
        assert absent not in files


def test_stage_finds_checkpoint_in_its_run_dir(float_run, tmp_path):
    float_dir, _ = float_run
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "float.ckpt").write_bytes(
        (float_dir / "checkpoints" / "float.ckpt").read_bytes()
    )
    run_app(run_dir, "stage=calibration", "recipe=int8")
    run_app(run_dir, "stage=analysis")  # finds checkpoints/calibration.ckpt
    out = run_dir / "quant_analysis"
    assert (out / "badcase.txt").is_file() and (out / "compare_per_layer.txt").is_file()
    assert "cat" in (out / "sensitivity_0.txt").read_text()


def test_mixed_recipe_with_a_fixed_ratio(float_run, tmp_path):
    float_dir, _ = float_run
    summary = run_app(
        tmp_path,
        "stage=calibration",
        "recipe=int8_int16",
        "recipe.int16_ratio=1",
        f"ckpt={float_dir / 'checkpoints' / 'float.ckpt'}",
    )
    final = summary.rows[-1]
    assert final.recipe == "int8_int16" and 0 < final.int16_ratio < 0.5
    assert any("fixed by the recipe" in d for d in summary.decisions)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="needs a calibration checkpoint: pass ckpt="):
        run_app(tmp_path, "stage=qat")
    with pytest.raises(ConfigError, match="ckpt='/nope.ckpt': no such file"):
        run_app(tmp_path, "stage=calibration", "ckpt=/nope.ckpt")


def test_j6m_rule_violation_is_refused_before_any_work(tmp_path):
    with pytest.raises(RecipeError) as err:
        run_app(
            tmp_path, "chip=j6m", "recipe=gemm_int16_other_fp16", "stage=calibration", "ckpt=/unused.ckpt"
        )
    message = str(err.value)
    assert "recipe=gemm_int16_other_fp16 cannot run on chip=j6m" in message
    assert "j6m: gemm cannot take int16 on both activation and weight" in message
    assert not (tmp_path / "checkpoints").exists()


def test_j6m_downgrade_is_listed(float_run, tmp_path):
    float_dir, _ = float_run
    run_app(
        tmp_path,
        "chip=j6m",
        "chip.on_violation=downgrade",
        "recipe=gemm_int16_other_fp16",
        "stage=calibration",
        f"ckpt={float_dir / 'checkpoints' / 'float.ckpt'}",
    )
    changelog = (tmp_path / "qconfig_changelog.txt").read_text()
    assert "qint16 -> qint8" in changelog and "j6m" in changelog
