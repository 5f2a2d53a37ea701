"""A user's own LightningModule / DataModule through `model._target_=... data._target_=...`."""

from __future__ import annotations

from examples.user_model import WineClassifier, WineDataModule
from tests.app.helpers import run_app

USER = [
    "model._target_=examples.user_model.WineClassifier",
    "data._target_=examples.user_model.WineDataModule",
    "prepare.submodule=net",
    "target.metric=val_acc",
]


def test_user_model_through_the_pipeline(tmp_path):
    summary = run_app(
        tmp_path, *USER, "train.max_epochs=15", "pipeline.sanity=false", "search.eval_batches=2"
    )
    rows = {row.step: row for row in summary.rows}
    assert rows["float"].metric > 0.6
    assert "calibration int16" in rows and "calibration all-int8" in rows and "qat" in rows
    assert (tmp_path / "checkpoints" / "qat.ckpt").is_file()
    report = next(tmp_path.glob("*_calibration_high/model_check_result.txt")).read_text()
    assert "input_quant" in report  # op names are relative to the user's submodule `net`
    assert WineClassifier.__module__ == WineDataModule.__module__ == "examples.user_model"


def test_plain_python_callbacks_example(tmp_path):
    from examples.callbacks_plain import main

    result = main(["--epochs", "20", "--qat-epochs", "1", "--out", str(tmp_path)])
    assert result["reload_identical"] == 1.0
    assert result["float"] > 0.6 and result["calibration"] > 0.6
    for path in ("calibration/model_check_result.txt", "sanity_lr0/sanity_check.txt", "qat.ckpt"):
        assert (tmp_path / path).is_file(), path
    assert (tmp_path / "qat" / "quant_analysis" / "compare_per_layer.txt").is_file()
