"""export_onnx: a bad argument is a ValueError / TypeError listing what is allowed; ExportError is kept
for what cannot be exported. Nothing is written either way."""

from __future__ import annotations

import pytest
import torch

import qat_lightning as ql
import qat_lightning.callbacks as cb
from qat_lightning.quant.export import EXPORT_OPSETS, ExportError, export_onnx
from tests.models import TinyResNet

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def calibrated():
    xs = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    model = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0],)).eval()
    ql.set_fake_quantize(model, "calibration")
    with torch.no_grad():
        for x in xs:
            model(x)
    ql.set_fake_quantize(model, "validation")
    return model, xs[0]


@pytest.mark.parametrize(
    ("opset", "error"),
    [
        (5, ValueError),
        (13, ValueError),
        (22, ValueError),
        (21.0, TypeError),
        ("21", TypeError),
        (True, TypeError),
    ],
)
def test_an_unsupported_opset_lists_the_allowed_ones(calibrated, tmp_path, opset, error) -> None:
    model, x = calibrated
    with pytest.raises(error, match=r"opset .*allowed: 20, 21") as info:
        export_onnx(model, (x,), tmp_path / "m.onnx", opset=opset)
    assert not isinstance(info.value, ExportError)
    assert list(tmp_path.iterdir()) == []


def test_the_callback_and_the_function_refuse_an_opset_alike(calibrated, tmp_path) -> None:
    model, x = calibrated
    with pytest.raises(ValueError):
        cb.ExportOnnx(opset=5)
    with pytest.raises(ValueError):
        export_onnx(model, (x,), tmp_path / "m.onnx", opset=5)


@pytest.mark.parametrize("name", ["m.txt", "m.bin", "m", "m.onnx.txt"])
def test_a_path_not_ending_in_onnx_is_a_value_error(calibrated, tmp_path, name) -> None:
    model, x = calibrated
    with pytest.raises(ValueError, match=r"path must end with \.onnx") as info:
        export_onnx(model, (x,), tmp_path / name)
    assert not isinstance(info.value, ExportError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("example", "error"), [("x", TypeError), ((), ValueError), ({"x": 1}, TypeError)])
def test_bad_example_inputs(calibrated, tmp_path, example, error) -> None:
    model, _ = calibrated
    with pytest.raises(error, match="example_inputs"):
        export_onnx(model, example, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_model_and_dynamic_batch_types(calibrated, tmp_path) -> None:
    model, x = calibrated
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_onnx("model", (x,), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="dynamic_batch must be True or False"):
        export_onnx(model, (x,), tmp_path / "m.onnx", dynamic_batch="no")
    assert list(tmp_path.iterdir()) == []


def test_export_failures_stay_export_errors(calibrated, tmp_path) -> None:
    model, x = calibrated
    with pytest.raises(ExportError, match="no quant nodes"):
        export_onnx(TinyResNet(), (x,), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="not a writable directory"):
        export_onnx(model, (x,), tmp_path / "missing" / "m.onnx")
    assert EXPORT_OPSETS == (20, 21)
