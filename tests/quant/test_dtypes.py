"""qat_lightning.quant.dtypes: the four constants and parse_dtype."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qat_lightning.quant import dtypes as qd
from qat_lightning.quant.dtypes import DTYPES, QuantDtype, float16, float32, parse_dtype, qint8, qint16


def test_integer_ranges_match_torch_integer_types() -> None:
    assert (qint8.qmin, qint8.qmax) == (-128, 127)
    assert (qint16.qmin, qint16.qmax) == (-32768, 32767)
    assert (qint8.qmin, qint8.qmax) == (torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max)
    assert (qint16.qmin, qint16.qmax) == (torch.iinfo(torch.int16).min, torch.iinfo(torch.int16).max)
    assert (qint8.bits, qint16.bits, float16.bits, float32.bits) == (8, 16, 16, 32)


def test_kind_flags() -> None:
    assert qint8.is_integer and qint16.is_integer
    assert not float16.is_integer and not float32.is_integer
    assert float16.is_float16 and not float16.is_float32
    assert float32.is_float32 and not float32.is_float16
    assert not qint8.is_float16 and not qint8.is_float32


def test_names_codes_and_registry() -> None:
    assert [d.name for d in (qint8, qint16, float16, float32)] == ["qint8", "qint16", "float16", "float32"]
    assert DTYPES == {"qint8": qint8, "qint16": qint16, "float16": float16, "float32": float32}
    codes = [d.code for d in DTYPES.values()]
    assert len(set(codes)) == 4
    assert str(qint8) == repr(qint8) == "qint8"
    assert f"{qint16}" == "qint16"


def test_constants_are_frozen_values() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        qint8.qmax = 255  # type: ignore[misc]
    assert QuantDtype("qint8", -128, 127, 8, 0) == qint8
    assert hash(QuantDtype("qint8", -128, 127, 8, 0)) == hash(qint8)
    assert len({qint8, qint16, float16, float32, qint8}) == 4


@pytest.mark.parametrize("value", [qint8, qint16, float16, float32])
def test_parse_constant_is_identity(value: QuantDtype) -> None:
    assert parse_dtype(value) is value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("qint8", qint8),
        ("qint16", qint16),
        ("float16", float16),
        ("float32", float32),
        ("int8", qint8),
        ("int16", qint16),
        ("fp16", float16),
        ("half", float16),
        ("torch.float16", float16),
        ("fp32", float32),
        ("float", float32),
        ("torch.float32", float32),
        ("QINT8", qint8),
        ("  Int16 ", qint16),
        ("FP16", float16),
    ],
)
def test_parse_names_and_aliases(text: str, expected: QuantDtype) -> None:
    assert parse_dtype(text) is expected


def test_parse_torch_dtypes() -> None:
    assert parse_dtype(torch.float16) is float16
    assert parse_dtype(torch.float32) is float32


@pytest.mark.parametrize("value", [qint8, qint16, float16, float32])
def test_parse_buffer_codes_round_trip(value: QuantDtype) -> None:
    assert parse_dtype(value.code) is value
    # as stored in a module buffer (a long tensor read back with int())
    assert parse_dtype(int(torch.tensor(value.code, dtype=torch.long))) is value


@pytest.mark.parametrize(
    "bad",
    ["qint4", "", "uint8", "bfloat16", torch.int8, torch.bfloat16, torch.float64, 99, -1, True, None, 8.0],
)
def test_parse_rejects_with_allowed_names(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_dtype(bad)  # type: ignore[arg-type]
    message = str(info.value)
    for name in ("qint8", "qint16", "float16", "float32"):
        assert name in message
    assert repr(bad) in message


def test_module_exports() -> None:
    for name in qd.__all__:
        assert hasattr(qd, name)
