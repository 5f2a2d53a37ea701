"""check_export: onnxruntime beside the fake-quant model; wrong scales and float graphs are caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qat_lightning as ql
from qat_lightning.analysis.export_check import check_export
from qat_lightning.quant.export import export_onnx
from tests.models import TinyResNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture
def exported(tmp_path):
    xs = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    model = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0][0],)).eval()
    ql.set_fake_quantize(model, "calibration")
    with torch.no_grad():
        for x, _ in xs:
            model(x)
    ql.set_fake_quantize(model, "qat")  # the check runs VALIDATION whatever the state
    result = export_onnx(model, (xs[0][0],), tmp_path / "m.onnx")
    return model, result, xs


def _reference_metrics(model, path, xs):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with ql.fake_quant_state(model, "validation"), torch.no_grad():
        ref = torch.cat([model(x) for x, _ in xs]).double()
    got = torch.cat([torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]) for x, _ in xs]).double()
    cos = float(torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0))
    agree = float((ref.argmax(1) == got.argmax(1)).double().mean())
    return cos, agree, float((ref - got).abs().max())


def test_check_passes_and_writes_reports(exported, tmp_path):
    model, result, xs = exported
    check = check_export(model, result.path, xs, out_dir=tmp_path / "reports")
    (out,) = check.outputs
    cos, agree, err = _reference_metrics(model, result.path, xs)
    assert out.name == "output_0" and out.numel == 24 * 10
    assert out.cosine == pytest.approx(cos, abs=1e-9) and out.top1_agreement == agree
    assert out.max_abs_error == pytest.approx(err, abs=1e-7)
    assert check.passed and check.problems == () and check.num_batches == 3
    assert check.qdq_nodes == check.integer_points == result.num_qdq
    assert all(n.state is ql.FakeQuantState.QAT for _, n in ql.iter_fake_quantize(model))
    doc = json.loads((tmp_path / "reports" / "export_check.json").read_text())
    assert doc["passed"] is True and doc["outputs"][0]["cosine"] == pytest.approx(out.cosine)
    assert "PASSED" in (tmp_path / "reports" / "export_check.txt").read_text()


def test_num_batches_and_input_fn(exported):
    model, result, xs = exported
    check = check_export(
        model, result.path, [{"image": x} for x, _ in xs], input_fn=lambda b: b["image"], num_batches=2
    )
    assert check.num_batches == 2 and check.outputs[0].numel == 16 * 10


def _tamper_scale(path, tensor, factor, dequantize_only):
    proto = onnx.load(str(path))
    dq = next(n for n in proto.graph.node if n.output[0] == tensor)
    old = next(i for i in proto.graph.initializer if i.name == dq.input[1])
    new = numpy_helper.from_array(numpy_helper.to_array(old) * factor, f"{old.name}/tampered")
    proto.graph.initializer.append(new)
    for node in proto.graph.node:
        if node is dq or (
            not dequantize_only and node.op_type == "QuantizeLinear" and node.output[0] == dq.input[0]
        ):
            node.input[1] = new.name
    onnx.save(proto, str(path))


@pytest.mark.parametrize(
    ("node", "factor", "dequantize_only"),
    [("fc.output_quant", 4.0, True), ("layer1.0.conv1.output_quant", 0.125, False)],
)
def test_wrong_scale_in_the_graph_is_caught(exported, node, factor, dequantize_only):
    model, result, xs = exported
    enc = {e.node: e for e in result.encodings}
    _tamper_scale(result.path, enc[node].onnx_tensors[0], factor, dequantize_only)
    check = check_export(model, result.path, xs)
    (out,) = check.outputs
    assert not check.passed and check.problems  # caught by the numbers, not the encodings:
    assert all(p.startswith(f"{out.name}: ") and " is below min_" in p for p in check.problems)
    assert out.cosine < check.min_cosine or out.sqnr_db < check.min_sqnr_db


def test_scale_changed_after_export_is_named(exported):
    model, result, xs = exported
    node = dict(ql.iter_fake_quantize(model))["layer1.0.conv1.output_quant"]
    node.scale.mul_(3.0)
    check = check_export(model, result.path, xs)
    assert not check.passed
    assert any("layer1.0.conv1.output_quant: scale changed" in p for p in check.problems)


def test_float_graph_is_not_accepted_as_quantized(exported, tmp_path):
    model, _, xs = exported
    path = tmp_path / "float.onnx"
    with ql.fake_quant_disabled(model):
        torch.onnx.export(TinyResNet().eval(), (xs[0][0],), str(path), dynamo=False, input_names=["x"])
    check = check_export(model, path, xs)
    assert not check.passed
    assert any("no QDQ node" in p for p in check.problems)
    assert any("no encodings file" in p for p in check.problems)


def test_bad_input(exported, tmp_path):
    model, result, xs = exported
    with pytest.raises(ValueError, match="no ONNX file"):
        check_export(model, tmp_path / "missing.onnx", xs)
    with pytest.raises(ValueError, match="no batch"):
        check_export(model, result.path, [])
    with pytest.raises(ValueError, match="graph takes 1 inputs"):
        check_export(model, result.path, xs, input_fn=lambda b: (b[0], b[0]))
    assert not np.isnan(check_export(model, result.path, xs[:1]).outputs[0].cosine)
