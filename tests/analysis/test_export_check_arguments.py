"""check_export refuses bad thresholds, files and folders where they arrive; a failed check says why."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import qat_lightning as ql
from qat_lightning.analysis.export_check import check_export
from qat_lightning.quant.export import export_onnx
from tests.analysis.test_export_check import _tamper_scale
from tests.models import TinyResNet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    xs = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    model = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0][0],)).eval()
    ql.set_fake_quantize(model, "calibration")
    with torch.no_grad():
        for x, _ in xs:
            model(x)
    ql.set_fake_quantize(model, "validation")
    result = export_onnx(model, (xs[0][0],), tmp_path_factory.mktemp("export") / "m.onnx")
    return model, result, xs


BAD_THRESHOLDS = [
    ({"min_cosine": 2.0}, ValueError, r"min_cosine must be a number in \[-1, 1\]"),
    ({"min_cosine": -1.5}, ValueError, r"min_cosine must be a number in \[-1, 1\]"),
    ({"min_cosine": math.nan}, ValueError, r"min_cosine must be a number in \[-1, 1\]"),
    ({"min_cosine": "0.99"}, TypeError, r"min_cosine must be a number in \[-1, 1\]"),
    ({"min_top1": -1.0}, ValueError, r"min_top1 must be a number in \[0, 1\]"),
    ({"min_top1": 1.5}, ValueError, r"min_top1 must be a number in \[0, 1\]"),
    ({"min_top1": math.nan}, ValueError, r"min_top1 must be a number in \[0, 1\]"),
    ({"min_sqnr_db": math.nan}, ValueError, "min_sqnr_db must be a finite number"),
    ({"min_sqnr_db": math.inf}, ValueError, "min_sqnr_db must be a finite number"),
    ({"min_sqnr_db": True}, TypeError, "min_sqnr_db must be a finite number"),
    ({"num_batches": 0}, ValueError, "num_batches must be a positive int"),
    ({"num_batches": 1.5}, TypeError, "num_batches must be a positive int"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_THRESHOLDS)
def test_thresholds_are_checked_before_anything_runs(exported, tmp_path, kwargs, error, match) -> None:
    model, result, xs = exported
    with pytest.raises(error, match=match):
        check_export(model, result.path, xs, out_dir=tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs", [{"min_cosine": -1.0}, {"min_cosine": 1.0}, {"min_top1": 0}, {"min_top1": 1}]
)
def test_the_ends_of_the_ranges_are_accepted(exported, tmp_path, kwargs) -> None:
    model, result, xs = exported
    check = check_export(model, result.path, xs, out_dir=tmp_path, **kwargs)
    assert check.passed or check.problems


@pytest.mark.parametrize("content", [b"not an onnx model\n", b"", b"\x08\x07"])
def test_a_file_that_is_not_onnx_is_named(exported, tmp_path, content) -> None:
    model, _, xs = exported
    path = tmp_path / "notes.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"notes\.onnx.*not an ONNX model"):
        check_export(model, path, xs, out_dir=tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_out_dir_that_is_a_file_is_refused(exported, tmp_path) -> None:
    model, result, xs = exported
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for out_dir in (taken, taken / "below"):
        with pytest.raises(ValueError, match=r"out_dir .*taken.* is a file, not a folder"):
            check_export(model, result.path, xs, out_dir=out_dir)
    assert taken.read_text() == "keep me"


@pytest.fixture(scope="module")
def tampered(exported, tmp_path_factory):
    """A copy of the export whose ``fc`` output scale is 4x in the graph: the numbers disagree."""
    model, result, xs = exported
    folder = tmp_path_factory.mktemp("tampered")
    path = folder / "m.onnx"
    shutil.copy(result.path, path)
    shutil.copy(result.encodings_path, folder / "m.encodings.json")
    enc = {e.node: e for e in result.encodings}
    _tamper_scale(path, enc["fc.output_quant"].onnx_tensors[0], 4.0, True)
    return model, path, xs


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"min_cosine": 1.0},
        {"min_sqnr_db": 500.0},
        {"min_top1": 1.0, "min_cosine": 1.0, "min_sqnr_db": 500.0},
        {"optimization": "disabled"},
        {"min_cosine": -1.0, "min_sqnr_db": -100.0, "min_top1": 0.0},
    ],
)
@pytest.mark.parametrize("source", ["exported", "tampered"])
def test_a_failed_check_always_lists_a_problem(request, tmp_path, source, kwargs) -> None:
    model, path, xs = request.getfixturevalue(source)[0:3]
    path = path.path if hasattr(path, "path") else path
    check = check_export(model, path, xs, out_dir=tmp_path, **kwargs)
    assert check.passed == (check.problems == ())
    assert ("problems:" in (tmp_path / "export_check.txt").read_text()) == (not check.passed)
    if kwargs.get("min_sqnr_db") == -100.0:
        assert check.passed


def test_threshold_problems_name_the_output_and_the_threshold(tampered, tmp_path) -> None:
    model, path, xs = tampered
    check = check_export(model, path, xs, out_dir=tmp_path)
    (out,) = check.outputs
    expected = []
    if out.cosine < 0.999:
        expected.append(f"{out.name}: cosine {out.cosine:.6f} is below min_cosine 0.999")
    if out.sqnr_db < 20.0:
        expected.append(f"{out.name}: SQNR {out.sqnr_db:.2f} dB is below min_sqnr_db 20 dB")
    if out.top1_agreement is not None and out.top1_agreement < 0.995:
        expected.append(f"{out.name}: top-1 agreement {out.top1_agreement:.4f} is below min_top1 0.995")
    assert expected and check.problems == tuple(expected) and not check.passed
