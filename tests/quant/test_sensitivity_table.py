"""SensitivityRow / SensitivityTable check their fields; what the sweep writes (NaN, inf rows) loads back."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.qconfig.sensitivity_table import (
    SENSITIVE_TYPES,
    TABLE_METHODS,
    SensitivityRow,
    SensitivityTable,
)


def _row(**changes: object) -> SensitivityRow:
    args: dict[str, object] = dict(
        op_name="conv", sensitive_type="weight", op_type="Conv2d", metric=0.5, quant_dtype="qint8"
    )
    args.update(changes)
    return SensitivityRow(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["activations", "wieght", "Activation", "", None])
def test_an_unknown_sensitive_type_is_refused_listing_the_allowed_ones(kind: object) -> None:
    with pytest.raises(ValueError, match=r"'conv'.*sensitive_type.*allowed: activation, weight"):
        _row(sensitive_type=kind)


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("quant_dtype", "int4", ValueError, "quant_dtype.*allowed: qint8, qint16, float16, float32"),
        ("quant_dtype", 0, ValueError, "quant_dtype"),
        ("metric", "high", ValueError, "metric must be a number"),
        ("metric", True, TypeError, "metric must be a number"),
        ("flops", -5, ValueError, "flops must be an int >= 0"),
        ("flops", 1.5, TypeError, "flops must be an int >= 0"),
        ("flops_share", -0.1, ValueError, "flops_share must be a finite number >= 0"),
        ("flops_share", math.nan, ValueError, "flops_share"),
        ("op_name", 3, TypeError, "op_name must be a str"),
        ("op_type", None, TypeError, "op_type must be a str"),
    ],
)
def test_bad_row_fields_are_refused_naming_the_row(
    field: str, value: object, error: type, match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        _row(**{field: value})
    assert "SensitivityRow" in str(info.value)


def test_the_sweep_values_are_kept_and_json_spellings_are_read() -> None:
    assert math.isnan(_row(metric=math.nan).metric)  # the sweep ranks NaN rows first: they are legitimate
    assert math.isnan(_row(metric=None).metric)  # NaN as the JSON writer spells it
    assert _row(metric="inf").metric == math.inf and _row(metric="-inf").metric == -math.inf
    assert _row(metric=3).metric == 3.0 and isinstance(_row(metric=3).metric, float)
    assert _row(quant_dtype="int16").quant_dtype == "qint16"
    assert _row(quant_dtype=torch.float16).quant_dtype == "float16"
    assert _row(quant_dtype=ql.qint8).quant_dtype == "qint8"


def test_table_fields_are_checked() -> None:
    with pytest.raises(TypeError, match=r"rows\[1\].*SensitivityRow.*got int"):
        SensitivityTable((_row(), 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rows must be a sequence"):
        SensitivityTable(_row())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method 'fast'.*allowed: exact, approximate"):
        SensitivityTable((), method="fast")
    with pytest.raises(TypeError, match="metric_name must be a non-empty str"):
        SensitivityTable((), metric_name=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric_name must be a non-empty str"):
        SensitivityTable((), metric_name="")
    with pytest.raises(TypeError, match="output_name must be a str"):
        SensitivityTable((), output_name=0)  # type: ignore[arg-type]
    table = SensitivityTable([_row()], metric_name="L3")  # a custom metric's name is its own
    assert isinstance(table.rows, tuple) and table.metric_name == "L3"
    assert TABLE_METHODS == ("exact", "approximate") and SENSITIVE_TYPES == ("activation", "weight")


def test_the_template_raises_exactly_the_typed_quant_point() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    def dtypes(kind: str, row: SensitivityRow | None = None) -> tuple[str, str]:
        table = SensitivityTable((row or _row(sensitive_type=kind),))
        setter = ql.QconfigSetter(templates=[ql.SensitivityTemplate(table, topk_or_ratio=1)])
        qm = ql.prepare(Tiny().eval(), example_inputs=torch.randn(1, 1, 5, 5), qconfig_setter=setter)
        nodes = dict(ql.iter_fake_quantize(qm))
        return str(nodes["conv.output_quant"].dtype), str(nodes["conv.weight_quant"].dtype)

    assert dtypes("activation") == ("qint16", "qint8")
    assert dtypes("weight") == ("qint8", "qint16")
    smuggled = _row()
    object.__setattr__(smuggled, "sensitive_type", "activations")  # past the row's own check
    with pytest.raises(ValueError, match="'activations'.*allowed: activation, weight"):
        dtypes("", smuggled)  # apply() matches each type explicitly: nothing falls through to weight


def _write(path: Path, rows: list[dict[str, object]], **extra: object) -> Path:
    path.write_text(json.dumps({"rows": rows, "metric_name": "L1", **extra}), encoding="utf-8")
    return path


def test_what_the_analysis_writes_loads_back(tmp_path: Path) -> None:
    from qat_lightning.analysis.reports.render import to_json
    from qat_lightning.app.tuning import load_sensitivity_table

    rows = (_row(metric=math.nan), _row(op_name="fc", metric=math.inf, flops=10, flops_share=0.5))
    table = SensitivityTable(rows, "-SQNR", "0", "approximate")
    path = tmp_path / "sensitivity_0.json"
    path.write_text(to_json(table), encoding="utf-8")
    loaded = load_sensitivity_table(path)
    assert math.isnan(loaded.rows[0].metric)
    assert loaded.rows[1] == rows[1] and (loaded.metric_name, loaded.method) == ("-SQNR", "approximate")
    assert dataclasses.replace(loaded.rows[0], metric=0.0) == dataclasses.replace(rows[0], metric=0.0)


def test_a_bad_file_names_the_row(tmp_path: Path) -> None:
    from qat_lightning.app.tuning import load_sensitivity_table

    good = {
        "op_name": "a",
        "sensitive_type": "weight",
        "op_type": "Linear",
        "metric": 1.0,
        "quant_dtype": "qint8",
    }
    bad = {**good, "op_name": "head.fc", "sensitive_type": "activations"}
    with pytest.raises(ValueError, match=r"'head.fc'.*'activations'.*allowed: activation, weight"):
        load_sensitivity_table(_write(tmp_path / "t.json", [good, bad]))
    with pytest.raises(ValueError, match=r"'a'.*quant_dtype 'int4'"):
        load_sensitivity_table(_write(tmp_path / "t.json", [{**good, "quant_dtype": "int4"}]))
    with pytest.raises(ValueError, match="method 'fast'"):
        load_sensitivity_table(_write(tmp_path / "t.json", [good], method="fast"))


def test_a_row_missing_a_field_or_not_an_object_is_named(tmp_path: Path) -> None:
    from qat_lightning.app.tuning import load_sensitivity_table

    with pytest.raises(ValueError, match=r"row 1 is not a sensitivity row.*metric"):
        load_sensitivity_table(
            _write(tmp_path / "t.json", [_row_dict("a"), {"op_name": "b", "sensitive_type": "weight"}])
        )
    with pytest.raises(ValueError, match=r"row 0 is not a sensitivity row"):
        load_sensitivity_table(_write(tmp_path / "t.json", ["head.fc"]))


def _row_dict(name: str) -> dict[str, object]:
    return {
        "op_name": name,
        "sensitive_type": "weight",
        "op_type": "Linear",
        "metric": 1.0,
        "quant_dtype": "qint8",
    }
