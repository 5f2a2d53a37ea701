"""compare_export_per_layer: onnxruntime's quant points vs the fake-quant nodes, found where they part."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qat_lightning as ql
from qat_lightning.analysis.export_layers import (
    compare_export_per_layer,
    first_export_mismatch,
    render_export_layers,
)
from qat_lightning.quant.calibrate import calibrate
from qat_lightning.quant.export import export_onnx
from tests.analysis.test_export_check import _tamper_scale
from tests.models import TinyResNet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _tiny_resnet(tmp_path, dtype=None):
    xs = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    setter = None if dtype is None else ql.get_qconfig(weight_dtype=dtype, out_dtype=dtype)
    model = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0],), qconfig_setter=setter).eval()
    calibrate(model.eval(), xs)  # leaves it in VALIDATION
    return model, export_onnx(model, (xs[0],), tmp_path / "m.onnx"), xs


@pytest.fixture
def exported(tmp_path):
    return _tiny_resnet(tmp_path)


def test_faithful_export_agrees_point_by_point(exported):
    model, result, xs = exported
    rows = compare_export_per_layer(model, result.path, xs, num_batches=2)
    assert len(rows) == result.num_qdq
    ops = {name for name, _ in ql.iter_quant_ops(model)}
    assert {r.op_name for r in rows} <= ops and rows[0].op_name == "x_quant"  # graph order: input first
    assert all(r.max_steps <= 1.0 and r.cosine > 0.9999 for r in rows)
    assert first_export_mismatch(rows) is None
    weights = [r for r in rows if r.role == "weight"]
    assert weights and all(r.max_abs_error == 0.0 for r in weights)  # integer initializers: exact
    assert "layer1.0.conv1" in render_export_layers(rows)


def test_first_mismatch_is_the_tampered_point(exported):
    model, result, xs = exported
    enc = {e.node: e for e in result.encodings}
    _tamper_scale(result.path, enc["layer1.0.conv1.output_quant"].onnx_tensors[0], 0.5, False)
    rows = compare_export_per_layer(model, result.path, xs)
    bad = first_export_mismatch(rows)
    assert bad is not None and bad.node == "layer1.0.conv1.output_quant" and bad.max_steps > 1.0
    before = rows[: rows.index(bad)]
    assert before and all(r.max_steps <= 1.0 for r in before)


def test_needs_the_encodings(exported, tmp_path):
    model, result, xs = exported
    result.encodings_path.unlink()
    with pytest.raises(ValueError, match="no encodings file"):
        compare_export_per_layer(model, result.path, xs)


def test_a_rounding_flip_measured_in_float32_is_not_a_mismatch(exported):
    model, result, xs = exported
    row = compare_export_per_layer(model, result.path, xs)[0]
    flip = dataclasses.replace(row, max_steps=1.0000019)  # float32 q*scale: one step reads 1.0000019
    assert first_export_mismatch([flip]) is None
    assert first_export_mismatch([dataclasses.replace(row, max_steps=1.01)]) is not None


@pytest.mark.parametrize("dtype", [ql.qint8, ql.qint16])
def test_a_wrong_scale_is_caught_beyond_the_noise_floor(tmp_path, dtype):
    model, result, xs = _tiny_resnet(tmp_path, dtype)
    clean = compare_export_per_layer(model, result.path, xs, num_batches=2, optimization="disabled")
    assert {r.dtype for r in clean} == {dtype.name} and first_export_mismatch(clean) is None
    assert all(r.noise_steps >= 0.0 for r in clean)
    assert all(r.max_steps <= 1.0 + 2 * r.noise_steps + 1e-3 for r in clean)
    enc = {e.node: e for e in result.encodings}
    _tamper_scale(result.path, enc["layer1.0.conv1.output_quant"].onnx_tensors[0], 1.5, False)
    rows = compare_export_per_layer(model, result.path, xs, num_batches=2, optimization="disabled")
    bad = first_export_mismatch(rows)
    assert bad is not None and bad.node == "layer1.0.conv1.output_quant"
    assert bad.max_steps > 10 * (1.0 + 2 * bad.noise_steps)  # far beyond what float32 noise explains


def test_noise_floor_widens_the_tolerance(exported):
    model, result, xs = exported
    row = compare_export_per_layer(model, result.path, xs)[0]
    two = dataclasses.replace(row, max_steps=2.0)
    assert first_export_mismatch([dataclasses.replace(two, noise_steps=0.5)]) is None  # 1 + 2 * 0.5
    assert first_export_mismatch([dataclasses.replace(two, noise_steps=0.4)]) is not None


def test_int16_slack_covers_float32_rounding_of_dequantized_values(exported):
    model, result, xs = exported
    row = dataclasses.replace(compare_export_per_layer(model, result.path, xs)[0], noise_steps=0.0)
    flip16 = dataclasses.replace(row, dtype="qint16", max_steps=1.004)  # 32767-step values read 1.004
    assert first_export_mismatch([flip16]) is None
    assert first_export_mismatch([dataclasses.replace(row, dtype="qint8", max_steps=1.004)]) is not None
    assert first_export_mismatch([dataclasses.replace(flip16, max_steps=1.05)]) is not None
