"""Rendering and atomic writes: strict JSON, CSV, no temporary files left behind."""

from __future__ import annotations

import json
import math
import os

import pytest
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable

from qat_lightning.analysis.reports import safe_filename, to_json, to_jsonable, write_atomic


def test_json_is_strict_with_nonfinite_values() -> None:
    table = SensitivityTable(
        (
            SensitivityRow("a", "activation", "add", math.nan, "qint8"),
            SensitivityRow("b", "weight", "Linear", math.inf, "qint8", 10, 0.5),
        )
    )
    data = json.loads(to_json(table))
    assert data["rows"][0]["metric"] is None and data["rows"][1]["metric"] == "inf"
    assert data["rows"][1]["flops_share"] == 0.5 and data["metric_name"] == "L1"
    assert to_jsonable((1, -math.inf, {"k": [math.nan]})) == [1, "-inf", {"k": [None]}]


def test_write_atomic_replaces_and_cleans_up(tmp_path) -> None:
    target = tmp_path / "sub" / "report.txt"
    write_atomic(target, "one")
    write_atomic(target, b"two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["report.txt"]

    with pytest.raises(TypeError):
        write_atomic(target, 3)  # type: ignore[arg-type]
    assert os.listdir(target.parent) == ["report.txt"] and target.read_text() == "two"


def test_safe_filename() -> None:
    assert safe_filename("0-1") == "0-1" and safe_filename("a/b c") == "a_b_c" and safe_filename("") == "out"
