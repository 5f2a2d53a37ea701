"""A short stage=pipeline run on the built-in example produces every artefact with sane content."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.app.helpers import run_app


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    # 0.999 x float: all-int8 misses it on this model (the wide-range concat), so every branch up to the
    # int16 search runs; search probes on 2 validation batches keep it short
    summary = run_app(run_dir, "target.ratio_of_float=0.999", "search.eval_batches=2")
    return run_dir, summary


def test_summary_table_and_decisions(pipeline_run):
    run_dir, summary = pipeline_run
    text = (run_dir / "summary.md").read_text()
    assert (
        "| stage | recipe | metric | % of float | int16 ratio | fp16 ratio | float32 (not quantized) "
        "| est. cost (x int8) | note |" in text
    )
    steps = [row.step for row in summary.rows]
    assert steps[0] == "float"
    assert "calibration int16" in steps and "calibration all-int8" in steps
    assert "qat" in steps and "sanity lr0" in steps and "sanity float" in steps
    rows = {row.step: row for row in summary.rows}
    float_metric = rows["float"].metric
    assert 0.5 < float_metric <= 1.0
    assert rows["calibration int16"].int16_ratio > 0.9 and rows["calibration int16"].cost == pytest.approx(
        2.0, abs=0.3
    )
    assert rows["calibration all-int8"].int16_ratio == 0.0 and rows[
        "calibration all-int8"
    ].cost == pytest.approx(1.0)
    assert rows["calibration all-int8"].float32_share == 0.0 and rows["float"].float32_share is None
    for row in summary.rows:
        assert row.metric is None or 0.0 <= row.metric <= 1.0
    assert rows["sanity lr0"].note in ("PASS", "FAIL") and rows["sanity float"].note in ("PASS", "FAIL")
    assert summary.decisions[0].startswith("target val/acc = ")
    assert any("all-int8" in d and "target" in d for d in summary.decisions)
    for decision in summary.decisions:  # every decision comes with its numbers
        assert re.search(r"\d\.\d{4}", decision), decision


def test_checkpoints_record_their_recipe(pipeline_run):
    run_dir, _ = pipeline_run
    ckpts = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert {
        "float.ckpt",
        "calibration_int16.ckpt",
        "calibration_int8.ckpt",
        "calibration.ckpt",
        "qat.ckpt",
    } <= ckpts
    qat = torch.load(run_dir / "checkpoints" / "qat.ckpt", weights_only=False)
    assert qat["qat_lightning"]["kind"] == "qat"
    assert qat["qat_lightning"]["recipe"]["chip"] == "j6m"
    assert 0 <= qat["qat_lightning"]["metric"] <= 1


def test_step_directories_hold_reports_and_events(pipeline_run):
    run_dir, summary = pipeline_run
    calib_dirs = [row.out_dir for row in summary.rows if row.step.startswith("calibration")]
    for out in calib_dirs:
        report = (out / "model_check_result.txt").read_text()
        assert "Each layer out qconfig" in report and "Dtype summary" in report
    int16_report = (calib_dirs[0] / "model_check_result.txt").read_text()
    assert "qint16" in int16_report
    events = list(run_dir.rglob("events.out.tfevents.*"))
    assert len(events) >= 4
    for mode in ("lr0", "float"):
        (sanity,) = run_dir.glob(f"*_sanity_{mode}/sanity_check.txt")
        assert f"Sanity check ({mode})" in sanity.read_text()


def test_analysis_and_search_artefacts(pipeline_run):
    run_dir, summary = pipeline_run
    analysis = list(run_dir.glob("*_analysis_low/quant_analysis"))
    if not analysis:
        pytest.skip("all-int8 met the target in this short run: no analysis step")
    out = analysis[0]
    for name in ("badcase.txt", "compare_per_layer.txt", "compare_per_layer.csv", "sensitivity_0.txt"):
        assert (out / name).is_file(), name
    table = json.loads((out / "sensitivity_0.json").read_text())
    assert table["rows"][0]["op_name"] == "cat"  # the wide-range concat is the most sensitive op
    assert (out / "mixed_precision.json").is_file()
    assert any("int16 ratio" in d and "raise" in d for d in summary.decisions)
    assert "cat" in (run_dir / "summary.md").read_text()


def test_last_step_exports_and_checks_the_chosen_model(pipeline_run):
    run_dir, summary = pipeline_run
    (out,) = run_dir.glob("*_export")
    assert {"model.onnx", "model.encodings.json", "export_check.txt", "export_check.json"} <= {
        p.name for p in out.iterdir()
    }
    check = json.loads((out / "export_check.json").read_text())
    row = summary.rows[-1]
    assert row.step.startswith("onnx export (QAT") and "ort cosine" in row.note
    assert check["outputs"][0]["cosine"] >= 0.999 and check["passed"]
    decision = next(d for d in summary.decisions if d.startswith("ONNX export"))
    assert f"cosine {check['outputs'][0]['cosine']:.5f}" in decision
    assert "onnx export" in (run_dir / "summary.md").read_text()


def test_export_stage_from_a_checkpoint(pipeline_run, tmp_path):
    run_dir, _ = pipeline_run
    summary = run_app(tmp_path, "stage=export", f"ckpt={run_dir / 'checkpoints' / 'qat.ckpt'}")
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "export_check.txt").is_file()
    assert summary.rows[-1].step == "onnx export (qat.ckpt)"
    assert "PASS" in summary.rows[-1].note


TINY = ["train.max_epochs=1", "train.limit_train_batches=2", "train.limit_val_batches=2", "logger=none"]


def _calibration_line(run_dir):
    (line,) = [ln for ln in (run_dir / "summary.md").read_text().splitlines() if "**calibration**" in ln]
    return line


def test_summary_reports_the_checkpoints_calibration_not_the_config(tmp_path):
    # a calibration with non-default settings, then stages from its checkpoint with other calibration.*
    run_app(tmp_path / "float", "stage=float", *TINY)
    float_ckpt = tmp_path / "float" / "checkpoints" / "float.ckpt"
    calib_dir = tmp_path / "calib"
    run_app(
        calib_dir,
        "stage=calibration",
        "recipe=int16",
        "calibration=minmax",
        "calibration.num_batches=2",
        f"ckpt={float_ckpt}",
        *TINY,
    )
    line = _calibration_line(calib_dir)
    assert line == "- **calibration**: minmax (weights minmax), 2 batches of the train data"
    calib_ckpt = calib_dir / "checkpoints" / "calibration.ckpt"
    qat_dir = tmp_path / "qat"
    other = ["calibration=mse", "calibration.num_batches=9"]
    run_app(qat_dir, "stage=qat", "sanity=none", "qat.max_steps=2", *other, f"ckpt={calib_ckpt}", *TINY)
    line = _calibration_line(qat_dir)
    assert line == (
        f"- **calibration**: minmax (weights minmax), 2 batches of the train data (from ckpt={calib_ckpt})"
    )
    assert "mse" not in line and "9 batches" not in line
    # a QAT checkpoint does not record the batches that calibrated it: unknown, never the config's 9
    qat_ckpt = qat_dir / "checkpoints" / "qat.ckpt"
    export_dir = tmp_path / "export"
    run_app(export_dir, "stage=export", "export.check_batches=0", *other, f"ckpt={qat_ckpt}", *TINY)
    line = _calibration_line(export_dir)
    assert line == (
        "- **calibration**: minmax (weights minmax), batches unknown (not recorded in the checkpoint) "
        f"(from ckpt={qat_ckpt})"
    )


def test_calibration_batches_read_from_the_calibration_state():
    from qat_lightning.app.checkpoints import calibration_batches, calibration_record

    state = {"num_batches": 20, "dataloader": "train", "batches_used": 4}
    ckpt = {"callbacks": {"Calibration{'submodule': 'model'}": state, "Other{}": {"batches_used": 7}}}
    assert calibration_batches(ckpt) == 4 and calibration_batches(ckpt, "model") == 4
    assert calibration_record(ckpt, "model") == (4, "train")
    assert calibration_batches(ckpt, "net") is None
    restored = {"callbacks": {"Calibration{'submodule': 'model'}": {**state, "batches_used": 0}}}
    assert calibration_batches(restored, "model") is None  # a QAT run: restored, not calibrated
    assert calibration_batches({"state_dict": {}}) is None and calibration_batches(None) is None
