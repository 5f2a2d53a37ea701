"""Post-fit reports (quant_analysis/) and the TensorBoard event file contents."""

from __future__ import annotations

import pytest
from cb_helpers import LitClassifier, make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qat_lightning as ql
from qat_lightning.callbacks import (
    Calibration,
    PrepareQuantization,
    QuantAnalysisCallback,
    QuantizationAwareTraining,
    QuantStatsMonitor,
    SanityCheck,
)
from qat_lightning.callbacks.analysis import INCOMPLETE_MARKER


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_post_fit_reports_and_tensorboard_contents(tmp_path, lit, data):
    analysis = QuantAnalysisCallback(num_steps=2, search_target=0.95)
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=10),
        QuantizationAwareTraining(),
        QuantStatsMonitor(),
        SanityCheck(mode="lr0", monitor="val_acc", tolerance=0.05),
        analysis,
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1)
    trainer.fit(lit, datamodule=data)
    log_dir = tmp_path / "run" / "version_0"
    out = log_dir / "quant_analysis"
    names = {p.name for p in out.iterdir()}
    assert {"badcase.txt", "badcase.pt", "compare_per_layer.txt", "compare_per_layer.csv"} <= names
    assert any(n.startswith("sensitivity_") and n.endswith(".txt") for n in names)
    assert INCOMPLETE_MARKER not in names
    assert analysis.outcome is not None and analysis.outcome.sensitivity
    assert analysis.outcome.plan is not None
    assert {"model_check_result.txt", "sanity_check.txt"} <= {p.name for p in log_dir.iterdir()}
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(lit.model))

    acc = _events(log_dir)
    scalars = set(acc.Tags()["scalars"])
    nodes = [name for name, node in ql.iter_fake_quantize(lit.model) if node.dtype.is_integer]
    for name in nodes:
        assert f"calibration/scale/{name}" in scalars
        assert f"quant/scale/{name}" in scalars and f"quant/saturation/{name}" in scalars
    assert {
        "quant/ratio_qint8",
        "quant/ratio_qint16",
        "quant/ratio_float16",
        "quant/saturation_max",
    } <= scalars
    assert {
        "sanity/lr0/passed",
        "sanity/lr0/reference",
        "sanity/lr0/result",
        "quant_analysis/seconds",
    } <= scalars
    assert acc.Scalars("quant/ratio_qint8")[0].value > 0.5
    saturation = [acc.Scalars(f"quant/saturation/{n}")[-1].value for n in nodes]
    assert all(0.0 <= s <= 1.0 for s in saturation)
    images = set(acc.Tags()["images"])
    assert "quant_analysis/compare_per_layer" in images
    assert any(tag.startswith("quant_analysis/sensitivity_") for tag in images)
    texts = {t.split("/text_summary")[0] for t in acc.Tags()["tensors"]}
    assert {
        "quant/model_check",
        "sanity/lr0",
        "quant_analysis/badcase",
        "quant_analysis/compare_per_layer",
    } <= texts


def test_on_demand_analysis_after_validate(tmp_path, lit, data):
    analysis = QuantAnalysisCallback(num_steps=1, sensitivity=False, run_on_fit_end=False)
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(10), analysis])
    trainer.validate(lit, datamodule=data, verbose=False)
    outcome = analysis.run_analysis(trainer, lit)
    assert outcome is not None and outcome.per_layer is not None and not outcome.sensitivity
    assert (outcome.out_dir / "compare_per_layer.txt").is_file()
    assert not any(p.name.startswith("sensitivity_") for p in outcome.files)


def test_failed_analysis_leaves_an_incomplete_marker(tmp_path, lit, data, monkeypatch):
    from qat_lightning.analysis import QuantAnalysis

    def boom(self, *args, **kwargs):
        raise RuntimeError("sensitivity exploded")

    monkeypatch.setattr(QuantAnalysis, "sensitivity", boom)
    analysis = QuantAnalysisCallback(num_steps=1)
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(10), analysis], max_epochs=0)
    with pytest.raises(RuntimeError, match="sensitivity exploded"):
        trainer.fit(lit, datamodule=data)
    marker = tmp_path / "run" / "version_0" / "quant_analysis" / INCOMPLETE_MARKER
    assert "sensitivity exploded" in marker.read_text()
    assert (marker.parent / "badcase.txt").is_file()  # what was done before stays


def test_non_tensorboard_logger_is_a_noop(tmp_path, data):
    from lightning.pytorch.loggers import CSVLogger

    lit = LitClassifier()
    callbacks = [PrepareQuantization(), Calibration(10), QuantizationAwareTraining(), QuantStatsMonitor()]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, logger=CSVLogger(str(tmp_path)))
    trainer.fit(lit, datamodule=data)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "quant/saturation_max" in metrics


def test_saturation_is_the_clipped_fraction(tmp_path, lit, data):
    import torch

    from qat_lightning.callbacks.monitor import clipped_count

    monitor = QuantStatsMonitor(nodes=["x_quant*"])
    narrow = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(None, dataloader=narrow), monitor])
    trainer.validate(lit, datamodule=data, verbose=False)
    (name, node), *_ = [(n, q) for n, q in ql.iter_fake_quantize(lit.model) if n.startswith("x_quant")]
    assert list(monitor.saturation) == [name]
    x = torch.cat([xb for xb, _ in data.val_dataloader()])
    bound = 127.5 * float(node.scale)
    expected = float(((x > bound) | (x < -128.5 * float(node.scale))).float().mean())
    assert monitor.saturation[name] == pytest.approx(expected)
    assert int(clipped_count(node, x)) == round(expected * x.numel())
    assert 0.01 < expected < 0.5  # calibrated on N(0, 1), validated on N(0.5, 2): the input node clips
