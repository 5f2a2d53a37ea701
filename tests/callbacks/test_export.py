"""ExportOnnx: QDQ ONNX + encodings + export_check written after fit by a real Trainer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from cb_helpers import make_trainer

import qat_lightning as ql
from qat_lightning.callbacks import Calibration, ExportOnnx, PrepareQuantization

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def test_export_after_fit_writes_model_encodings_and_check(tmp_path, lit, data):
    export = ExportOnnx(path="deploy/model.onnx", check_batches=2)
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=4), export], max_epochs=0
    )
    trainer.fit(lit, datamodule=data)
    out = tmp_path / "run" / "version_0" / "deploy"
    assert {p.name for p in out.iterdir()} == {
        "model.onnx",
        "model.encodings.json",
        "export_check.txt",
        "export_check.json",
    }
    outcome = export.outcome
    assert outcome is not None and outcome.check is not None and outcome.check.passed
    assert outcome.check.num_batches == 2
    assert outcome.result.num_qdq == sum(1 for _, n in ql.iter_fake_quantize(lit.model) if n.dtype.is_integer)
    doc = json.loads((out / "export_check.json").read_text())
    assert doc["passed"] and doc["outputs"][0]["top1_agreement"] == outcome.check.outputs[0].top1_agreement


def test_no_check_and_absolute_path(tmp_path, lit, data):
    target = tmp_path / "abs" / "m.onnx"
    export = ExportOnnx(path=target, check_batches=0)
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=2), export], max_epochs=0
    )
    trainer.fit(lit, datamodule=data)
    assert export.outcome.check is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.encodings.json", "m.onnx"]


def test_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"\.onnx"):
        ExportOnnx(path="model.pt")
    with pytest.raises(ValueError, match="check_batches"):
        ExportOnnx(check_batches=-1)
    with pytest.raises(ValueError, match="allowed: 20, 21"):
        ExportOnnx(opset=17)
    with pytest.raises(ValueError, match="allowed: 'train', 'val', 'test'"):
        ExportOnnx(dataloader="holdout")
    with pytest.raises(ValueError, match="allowed: 'disabled', 'basic', 'extended', 'all'"):
        ExportOnnx(optimization="O3")
    assert ExportOnnx().optimization == "all"


def test_unprepared_network_is_refused(tmp_path, lit, data):
    trainer = make_trainer(tmp_path, [ExportOnnx()], max_epochs=0)
    with pytest.raises(ValueError, match="ExportOnnx: `model` has no quant nodes"):
        trainer.fit(lit, datamodule=data)


def test_failed_check_writes_the_per_layer_comparison(tmp_path, lit, data, monkeypatch):
    import qat_lightning.callbacks.export as export_mod
    from tests.analysis.test_export_check import _tamper_scale

    real_check = export_mod.check_export

    def check_a_broken_file(model, path, *args, **kwargs):  # a deployment that disagrees on one scale
        enc = {e.node: e for e in ql.quant.export.read_encodings(path)}
        node = next(n for n, e in enc.items() if e.role == "output" and e.onnx_tensors)
        _tamper_scale(path, enc[node].onnx_tensors[0], 0.25, False)
        return real_check(model, path, *args, **kwargs)

    monkeypatch.setattr(export_mod, "check_export", check_a_broken_file)
    export = ExportOnnx(path="m.onnx", check_batches=2)
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=2), export], max_epochs=0
    )
    with pytest.warns(UserWarning, match="first quant point where onnxruntime and fake quant part: .*steps"):
        trainer.fit(lit, datamodule=data)
    assert not export.outcome.check.passed
    table = (tmp_path / "run" / "version_0" / "compare_export_per_layer.txt").read_text()
    assert table.startswith("op_name") and "cosine" in table


def test_export_keeps_frozen_batchnorms_frozen(tmp_path, lit, data):
    """Mid-training export (train mode, BatchNorms frozen): every submodule keeps its own mode."""
    export = ExportOnnx(path="m.onnx", check_batches=1, run_on_fit_end=False)
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=2), export], max_epochs=0
    )
    trainer.fit(lit, datamodule=data)
    model = lit.model
    model.train()
    ql.freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and not any(m.training for m in bns)
    flags = {name: m.training for name, m in model.named_modules()}
    stats = [m.running_mean.clone() for m in bns]
    outcome = export.export(trainer, lit)
    assert outcome is not None and outcome.check is not None
    assert {name: m.training for name, m in model.named_modules()} == flags
    ql.set_fake_quantize(model, "qat")
    model(next(iter(data.train_dataloader()))[0])  # a QAT step: frozen statistics stay
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats, strict=True))


def test_nodes_left_in_float_state_are_named_in_a_warning(tmp_path, lit, data):
    """The export is the deployed model (every node as VALIDATION): FLOAT nodes are quantized in it."""
    export = ExportOnnx(path="m.onnx", check_batches=1, run_on_fit_end=False)
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=2), export], max_epochs=0
    )
    trainer.fit(lit, datamodule=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export.export(trainer, lit)  # every node in VALIDATION: no warning
    nodes = list(ql.iter_fake_quantize(lit.model))
    name, node = nodes[-1]
    node.state = ql.FakeQuantState.FLOAT
    with pytest.warns(UserWarning, match=rf"1 quant node\(s\) are in FLOAT state in the model \({name}\)"):
        outcome = export.export(trainer, lit)
    assert outcome is not None and outcome.result.num_qdq == sum(1 for _, n in nodes if n.dtype.is_integer)
    assert node.state is ql.FakeQuantState.FLOAT
