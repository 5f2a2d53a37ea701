from __future__ import annotations

import os
import pathlib

import pytest
import torch
from torch import nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import OpInfo, OpKind, PrepareRecord
from qat_lightning.quant.preparation.model_check import (
    CallCountRow,
    DtypeSummaryRow,
    FusableRow,
    ModelCheckReport,
    OutQconfigRow,
    PromptRow,
    WeightQconfigRow,
    check_model,
    write_changelog,
)

CHANGE = "conv#1: weight qint16 -> qint8 (j6m: gemm cannot take int16 on both activation and weight)"


def attach(module: nn.Module, info: OpInfo, inputs=(), weight=None, output=None) -> nn.Module:
    module.op_info = info
    module.input_quant = nn.ModuleList(inputs) if inputs else None
    module.weight_quant = weight
    module.output_quant = output
    return module


class FakePrepared(nn.Module):
    """quant -> conv -> relu -> conv (2nd call, "conv#1"); add(relu, speed_quant); "unused" never runs.

    conv + relu were not fused; speed_quant has a fixed scale (threshold 200, qint8)."""

    def __init__(self, conv1_weight: str = "qint8") -> None:
        super().__init__()
        self.quant = attach(
            nn.Identity(),
            OpInfo("quant", "quant", OpKind.INPUT, "quant", flops=64),
            output=FakeQuantize("qint8"),
        )
        self.speed_quant = attach(
            nn.Identity(),
            OpInfo("speed_quant", "quant", OpKind.INPUT, "speed_quant", flops=64),
            output=FakeQuantize("qint8", "fixed", observer_kwargs={"threshold": 200.0}),
        )
        self.conv = attach(
            nn.Conv2d(4, 4, 1),
            OpInfo("conv", "Conv2d", OpKind.GEMM, "conv", input_producers=("quant",), flops=1000),
            inputs=[FakeQuantize("float32")],  # pass-through: takes quant's qint8
            weight=FakeQuantize("qint8", ch_axis=0, num_channels=4),
            output=FakeQuantize("qint8"),
        )
        self.relu = attach(
            nn.ReLU(),
            OpInfo("relu", "ReLU", OpKind.OTHER, "relu", input_producers=("conv",), flops=64),
            output=FakeQuantize("qint16"),
        )
        second = nn.Module()
        self.add_module("conv#1", second)
        attach(
            second,
            OpInfo(
                "conv#1", "Conv2d", OpKind.GEMM, "conv", call_index=1, input_producers=("relu",), flops=1000
            ),
            inputs=[FakeQuantize("float32")],  # takes relu's qint16
            weight=FakeQuantize(conv1_weight, ch_axis=0, num_channels=4),
            output=FakeQuantize("qint8"),
        )
        self.add = attach(
            nn.Identity(),
            OpInfo("add", "add", OpKind.OTHER, "add", input_producers=("relu", "speed_quant"), flops=64),
            output=FakeQuantize("float16", "mse"),
        )
        self.unused = nn.Linear(2, 2)
        self.quant_op_order = ["quant", "speed_quant", "conv", "relu", "conv#1", "add"]
        self.prepare_record = PrepareRecord(
            method="fx",
            qat_mode="fuse_bn",
            chip="j6m",
            call_counts=(
                ("quant", 1),
                ("speed_quant", 1),
                ("conv", 2),
                ("relu", 1),
                ("add", 1),
                ("unused", 0),
            ),
            fused=(),
            unfused=(("conv", "relu"),),
            changelog=(CHANGE,),
            notes=("traced with torch.fx",),
        )


@pytest.fixture
def report() -> ModelCheckReport:
    return check_model(FakePrepared())


def test_fusable_and_call_counts(report: ModelCheckReport) -> None:
    assert report.fusable == (FusableRow(0, "conv", "Conv2d"), FusableRow(0, "relu", "ReLU"))
    counts = {r.name: r for r in report.call_counts}
    assert counts["conv"] == CallCountRow("conv", 2, "shared module")
    assert counts["unused"] == CallCountRow("unused", 0, "never called")
    assert counts["relu"] == CallCountRow("relu", 1, "")
    assert (report.method, report.qat_mode, report.chip) == ("fx", "fuse_bn", "j6m")


def test_out_and_weight_qconfig_tables(report: ModelCheckReport) -> None:
    rows = {r.name: r for r in report.out_qconfigs}
    assert [r.name for r in report.out_qconfigs] == ["quant", "speed_quant", "conv", "relu", "conv#1", "add"]
    assert rows["quant"] == OutQconfigRow("quant", "quant", "float32", "qint8", "-1", "minmax")
    assert rows["speed_quant"].observer == "fixed"
    assert rows["conv"] == OutQconfigRow("conv", "Conv2d", "qint8", "qint8", "-1", "minmax")
    assert rows["conv#1"].input_dtype == "qint16"
    assert rows["add"] == OutQconfigRow("add", "add", "qint16, qint8", "float16", "-1", "mse")
    assert report.weight_qconfigs == (
        WeightQconfigRow("conv", "Conv2d", "qint8", "0", "minmax"),
        WeightQconfigRow("conv#1", "Conv2d", "qint8", "0", "minmax"),
    )


def test_prompts(report: ModelCheckReport) -> None:
    scale = float(torch.tensor(200.0 / 127, dtype=torch.float32))
    msgs = {(r.name, r.msg) for r in report.prompts}
    assert ("speed_quant", f"Fixed scale {scale!r} (output, qint8)") in msgs
    assert ("relu", "High precision output qint16") in msgs
    assert ("add", "High precision output float16") in msgs
    assert any(n == "add" and m.startswith("float16 on j6m is slow") for n, m in msgs)
    assert ("add", "Inputs have different dtypes (qint16, qint8): they are requantized") in msgs
    assert PromptRow("conv#1", "Conv2d", f"Chip downgrade:{CHANGE.partition(':')[2]}") in report.prompts
    assert not any(m.startswith("Not supported") for _, m in msgs)
    # j6p: float16 is fast, no slow prompt
    assert not any("slow" in r.msg for r in check_model(FakePrepared(), chip="j6p").prompts)


def test_chip_dislikes_actual_node_dtypes() -> None:
    report = check_model(FakePrepared(conv1_weight="qint16"))
    assert (
        PromptRow(
            "conv#1",
            "Conv2d",
            "Not supported by j6m: weight is qint16"
            " (j6m: gemm cannot take int16 on both activation and weight)",
        )
        in report.prompts
    )


def test_dtype_summary(report: ModelCheckReport) -> None:
    total = 64 + 64 + 1000 + 64 + 1000 + 64
    assert report.dtype_summary == (
        DtypeSummaryRow("qint8", 3, 64 + 64 + 1000, (64 + 64 + 1000) / total),
        DtypeSummaryRow("qint16", 2, 64 + 1000, (64 + 1000) / total),  # relu; conv#1 reads qint16
        DtypeSummaryRow("float16", 1, 64, 64 / total),
        DtypeSummaryRow("float32", 0, 0, 0.0),
    )


def test_text_has_seed_sections(report: ModelCheckReport) -> None:
    text = report.to_text()
    for header in (
        "Fusable modules are listed below:",
        "Each module called times:",
        "Each layer out qconfig:",
        "Weight qconfig:",
        "Please check if these OPs qconfigs are expected..",
        "Dtype summary:",
        "Notes:\ntraced with torch.fx",
    ):
        assert header in text
    assert "Module Name" in text and "| Input dtype" in text
    assert repr(float(torch.tensor(200.0 / 127))) in text
    assert "shared module" in text and "never called" in text
    assert "qint8    3      1128     50.00%" in text  # 1128 of 2256 FLOPs


def test_no_record_no_ops_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a prepared model"):
        check_model(nn.Linear(2, 2))
    model = FakePrepared()
    del model.prepare_record
    assert check_model(model).method == "unknown"


def test_write_is_atomic(
    tmp_path: pathlib.Path, report: ModelCheckReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sub" / "model_check_result.txt"
    report.write(path)
    assert path.read_text() == report.to_text()
    assert os.listdir(path.parent) == ["model_check_result.txt"]
    path.write_text("old content")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        report.write(path)
    assert path.read_text() == "old content"
    assert os.listdir(path.parent) == ["model_check_result.txt"]


def test_write_changelog(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "qconfig_changelog.txt"
    write_changelog(path, [CHANGE, "add: output float32 -> float16 (j6p: ...)"])
    assert path.read_text().splitlines() == [CHANGE, "add: output float32 -> float16 (j6p: ...)"]
    write_changelog(path, [])
    assert path.read_text() == ""
    assert os.listdir(tmp_path) == ["qconfig_changelog.txt"]
