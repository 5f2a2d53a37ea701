"""The analysis on real prepare() output (tests/models.py): fx CNN and encoder, eager fallback, alignment."""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import pytest
import torch

import qat_lightning as ql
from qat_lightning.analysis import (
    ExportLayerComparison,
    LayerComparison,
    QuantAnalysis,
    search_mixed_precision,
)
from qat_lightning.analysis.compare.metrics import resolve_metric
from qat_lightning.analysis.sensitivity.exact import exact_sensitivity, sensitivity_targets

prepare_module = pytest.importorskip("qat_lightning.quant.preparation.prepare")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
models = pytest.importorskip("models")


def _prepared(cls, method: str = "auto", batch: int = 8):
    torch.manual_seed(0)
    model = cls().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_module.prepare(model, cls.example_inputs(batch), method=method)
    ql.set_fake_quantize(prepared, ql.FakeQuantState.CALIBRATION)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            prepared(*(torch.randn(t.shape, generator=gen) for t in cls.example_inputs(batch)))
    ql.set_fake_quantize(prepared, ql.FakeQuantState.VALIDATION)
    return model, prepared


def _batches(cls, n: int = 2, batch: int = 8):
    gen = torch.Generator().manual_seed(2)
    return [tuple(torch.randn(t.shape, generator=gen) for t in cls.example_inputs(batch)) for _ in range(n)]


def test_cnn_full_workflow_single_and_two_models(tmp_path) -> None:
    model, prepared = _prepared(models.TinyResNet)
    assert isinstance(prepared, torch.fx.GraphModule)
    data = _batches(models.TinyResNet)
    single = QuantAnalysis(prepared, out_dir=tmp_path / "one")
    single.auto_find_bad_case(data)
    single.run()
    one = single.compare_per_layer()
    assert [r.mod_name for r in one.rows] == list(prepared.quant_op_order)
    pair = QuantAnalysis(model, prepared, out_dir=tmp_path / "two")
    pair.auto_find_bad_case(data)
    for a, b in zip(pair.bad_cases.rows, single.bad_cases.rows, strict=True):  # FLOAT ≈ the float model
        assert a.index == b.index and a.value == pytest.approx(b.value, rel=1e-4)
    pair.run()
    two = pair.compare_per_layer()
    assert two.unaligned == ()  # fused conv-bn-(add)-relu, shared relu and the input all align
    for a, b in zip(one.rows, two.rows, strict=True):
        assert a.cosine == pytest.approx(b.cosine, abs=1e-4) and a.base_model_max == pytest.approx(
            b.base_model_max, rel=1e-4, abs=1e-5
        )
    assert two.row("layer1.0.conv2").base_op_type == "ReLU" and two.row("x_quant").base_op_type == "input"
    tables = single.sensitivity()
    assert len(tables) == 1 and len(tables[0].rows) == len(sensitivity_targets(prepared))
    assert tables[0].rows[-1].metric < 0.1 * tables[0].rows[0].metric
    assert model.training is False and prepared.training is False


@pytest.mark.parametrize("cls", ["TinyResNet", "TinyEncoder"])
def test_downstream_slice_equals_naive_on_prepared_graphs(cls: str) -> None:
    _, prepared = _prepared(getattr(models, cls), batch=2)
    inputs = _batches(getattr(models, cls), 1, 2)[0]
    targets = sensitivity_targets(prepared)
    metric = resolve_metric("L1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no in-place fallback on prepare()'s graphs
        sliced = exact_sensitivity(prepared, inputs, metric, targets)
    assert sliced == exact_sensitivity(prepared, inputs, metric, targets, use_slice=False)


def test_eager_fallback_model_and_search(tmp_path) -> None:
    _, prepared = _prepared(models.DataDependentModel)
    assert not isinstance(prepared, torch.fx.GraphModule)
    data = _batches(models.DataDependentModel)
    qa = QuantAnalysis(prepared, out_dir=tmp_path)
    qa.auto_find_bad_case(data)
    qa.run()
    assert len(qa.compare_per_layer(plot=False).rows) == len(prepared.quant_op_order)
    (table,) = qa.sensitivity(plot=False)
    (x,) = data[0]
    with torch.no_grad(), ql.fake_quant_disabled(prepared):
        ref = prepared(x)

    def eval_fn(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - ref).abs().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no index-op warning: observers never run inside the analysis
        plan = search_mixed_precision(prepared, table, eval_fn, target=eval_fn(prepared) / 2)
    assert plan.reached and plan.raised


def test_an_uncalibrated_model_is_refused_with_one_error(tmp_path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_module.prepare(models.TinyResNet().eval(), models.TinyResNet.example_inputs(8))
    with pytest.raises(ql.UncalibratedModelError, match=r"QuantAnalysis: the model is not calibrated"):
        QuantAnalysis(prepared, out_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        QuantAnalysis(prepared, out_dir=tmp_path, strict=False)
    assert [str(w.message).count("not calibrated") for w in caught] == [1]


# ---------------------------------------------------------------------- reference="onnxruntime"
@pytest.fixture
def deployed(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qat_lightning.quant.export import export_onnx

    model, prepared = _prepared(models.TinyResNet)
    result = export_onnx(prepared, models.TinyResNet.example_inputs(8), tmp_path / "m.onnx")
    return prepared, result, _batches(models.TinyResNet)


def test_onnxruntime_reference_finds_the_wrong_scale_at_its_op(deployed, tmp_path) -> None:
    from tests.analysis.test_export_check import _tamper_scale

    prepared, result, data = deployed
    clean = QuantAnalysis(
        prepared, out_dir=tmp_path / "clean", reference="onnxruntime", onnx_path=result.path
    )
    clean.run(data)
    ok = clean.compare_per_layer(plot=False)
    assert isinstance(ok, ExportLayerComparison) and ok.first_mismatch is None
    assert len(ok.rows) == result.num_qdq and ok.rows[0].op_name == "x_quant"  # graph order
    assert (
        "every quant point within 1 step" in (tmp_path / "clean" / "compare_export_per_layer.txt").read_text()
    )

    node = "layer1.0.conv2.output_quant"
    _tamper_scale(result.path, {e.node: e for e in result.encodings}[node].onnx_tensors[0], 0.25, False)
    qa = QuantAnalysis(prepared, out_dir=tmp_path / "qa", reference="onnxruntime", onnx_path=result.path)
    qa.auto_find_bad_case(data)
    comparison = qa.compare_per_layer()  # default inputs: the bad cases
    bad = comparison.first_mismatch
    assert bad is not None and bad.node == node and bad.max_steps > 1.0
    assert all(r.max_steps <= 1.0 for r in comparison.rows[: comparison.rows.index(bad)])
    out = tmp_path / "qa"
    assert f"first mismatch at {bad.op_name}" in (out / "compare_export_per_layer.txt").read_text()
    csv_rows = (out / "compare_export_per_layer.csv").read_text().splitlines()
    assert len(csv_rows) == len(comparison.rows) + 1 and node in csv_rows[comparison.rows.index(bad) + 1]
    assert json.loads((out / "compare_export_per_layer.json").read_text())["rows"][0]["op_name"] == "x_quant"
    assert (out / "compare_export_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "compare_per_layer.txt").exists() and prepared.training is False


def test_reference_is_validated_and_float_stays_the_default(deployed, tmp_path) -> None:
    prepared, result, data = deployed
    with pytest.raises(ValueError, match="allowed: float, onnxruntime"):
        QuantAnalysis(prepared, out_dir=tmp_path, reference="tensorrt")
    with pytest.raises(ValueError, match="needs onnx_path"):
        QuantAnalysis(prepared, out_dir=tmp_path, reference="onnxruntime")
    with pytest.raises(ValueError, match="no file"):
        QuantAnalysis(prepared, out_dir=tmp_path, reference="onnxruntime", onnx_path=tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="onnxruntime' only"):
        QuantAnalysis(prepared, out_dir=tmp_path, onnx_path=result.path)
    deployed_qa = QuantAnalysis(prepared, out_dir=tmp_path, reference="onnxruntime", onnx_path=result.path)
    with pytest.raises(ValueError, match="reference='float' only"):
        deployed_qa.compare_per_layer(range_factor=2.0)
    default = QuantAnalysis(prepared, out_dir=tmp_path / "float")
    assert default.reference == "float"
    default.run(data)
    assert isinstance(default.compare_per_layer(plot=False), LayerComparison)
    with pytest.raises(ValueError, match="reference='onnxruntime'"):
        default.compare_deployed_per_layer()
    with pytest.raises(ValueError, match="onnxruntime' only"):
        default.compare_per_layer(max_steps=2.0)
    assert not any(p.name.startswith("compare_export") for p in tmp_path.rglob("*"))
