"""The advice in the app: stage=qat with qat.lr_probe.lrs, stage=analysis with the dual-int16 diagnosis."""

from __future__ import annotations

import pytest

from tests.app.helpers import calibration_checkpoint, run_app


@pytest.fixture(scope="module")
def calib_ckpt(tmp_path_factory):
    float_overrides = ("train.max_epochs=8", "data.batch_size=64")
    return calibration_checkpoint(tmp_path_factory.mktemp("lrprobe"), float_overrides)


def test_qat_stage_with_lr_probe(calib_ckpt, tmp_path):
    summary = run_app(
        tmp_path, "stage=qat", "qat.lr_probe.lrs=[1.0,1.0e-3]", "qat.lr_probe.steps=3", f"ckpt={calib_ckpt}"
    )
    steps = [r.step for r in summary.rows]
    assert steps == ["lr probe 1", "lr probe 0.001", "qat"]
    probe = {r.step: r for r in summary.rows[:2]}
    best = max(probe.values(), key=lambda r: r.metric)
    assert best.note == "3 steps, chosen" and all(r.note.startswith("3 steps") for r in probe.values())
    chosen_lr = best.step.removeprefix("lr probe ")
    assert any(f"QAT uses lr={chosen_lr}" in d for d in summary.decisions)
    text = (tmp_path / "summary.md").read_text()
    assert "| lr probe 1 |" in text and "QAT LR probe" in text
    probe_dir = next(tmp_path.glob("*_lr_probe"))
    assert "| lr | val/acc | chosen |" in (probe_dir / "lr_probe.md").read_text()
    assert list(probe_dir.glob("events.out.tfevents.*"))


def test_analysis_stage_writes_the_dual_int16_diagnosis(calib_ckpt, tmp_path):
    run_app(tmp_path, "stage=analysis", "analysis.num_steps=1", f"ckpt={calib_ckpt}")
    text = (tmp_path / "quant_analysis" / "dual_int16.txt").read_text()
    assert text.startswith("Dual-int16 diagnosis (j6m; gemm double int16: no)")
    assert "highly sensitive = top-10" in text


def test_troubleshoot_passes_a_sound_pipeline(calib_ckpt, tmp_path):
    float_ckpt = calib_ckpt.parent.parent.parent / "float" / "checkpoints" / "float.ckpt"
    summary = run_app(tmp_path, "stage=troubleshoot", f"ckpt={float_ckpt}")
    text = (tmp_path / "troubleshoot.md").read_text()
    assert "| check | expected | reference | got | diff | verdict | at fault |" in text
    assert text.count("| PASS |") == 3, text
    assert "all three checks pass" in summary.facts["verdict"]


def test_troubleshoot_lr0_check_holds_at_the_default_tolerance(calib_ckpt, tmp_path):
    # int8 on the built-in example: the lr=0 check used to fail from scale / BN drift alone
    float_ckpt = calib_ckpt.parent.parent.parent / "float" / "checkpoints" / "float.ckpt"
    overrides = ("stage=troubleshoot", "recipe=int8", "sanity.tolerance=0.005", "sanity.steps=12")
    run_app(tmp_path, *overrides, f"ckpt={float_ckpt}")  # old code: lr=0 drifted +0.0028 here
    text = (tmp_path / "troubleshoot.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| lr = 0"))
    assert "| PASS |" in row and "| +0.0000 |" in row, text
    fake_quant_off = next(line for line in text.splitlines() if line.startswith("| fake quant off"))
    assert "| PASS |" in fake_quant_off or "not conclusive" in fake_quant_off, text


def test_troubleshoot_pinpoints_a_preprocessing_mismatch(calib_ckpt, tmp_path):
    float_ckpt = calib_ckpt.parent.parent.parent / "float" / "checkpoints" / "float.ckpt"
    summary = run_app(
        tmp_path,
        "stage=troubleshoot",
        "data._target_=tests.app.broken_data.MisprocessedDigits",
        f"ckpt={float_ckpt}",
    )
    text = (tmp_path / "troubleshoot.md").read_text()
    first = next(line for line in text.splitlines() if line.startswith("| float fine-tune"))
    assert "| FAIL |" in first and "training pipeline" in first, text
    assert "not conclusive" in text
    assert "check 'float fine-tune' fails: at fault is the training pipeline" in summary.facts["verdict"]


def test_j6p_analysis_writes_the_fp16_diagnosis(calib_ckpt, tmp_path):
    float_ckpt = calib_ckpt.parent.parent.parent / "float" / "checkpoints" / "float.ckpt"
    common = ("chip=j6p", "recipe=gemm_int8_other_fp16")
    run_app(tmp_path, "stage=calibration", *common, f"ckpt={float_ckpt}")
    run_app(tmp_path, "stage=analysis", *common, "analysis.num_steps=1")
    text = (tmp_path / "quant_analysis" / "fp16_diagnosis.txt").read_text()
    assert text.startswith("fp16 diagnosis (fp16 max 65504")
