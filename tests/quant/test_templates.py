from __future__ import annotations

import pytest
import torch

from qat_lightning.quant.dtypes import float16, float32, qint8, qint16
from qat_lightning.quant.op_names import match_name
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.qconfig.qconfig import get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable
from qat_lightning.quant.qconfig.templates import (
    PRECISION_ORDER,
    ConvDtypeTemplate,
    MatmulDtypeTemplate,
    ModuleNameTemplate,
    SensitivityTemplate,
    Template,
    effective_input_dtypes,
    precision_rank,
)

TABLE = SensitivityTable((SensitivityRow("a", "activation", "add", 1.0, "qint8"),))


@pytest.mark.parametrize(
    ("prefix", "name", "expected"),
    [
        ("", "anything", True),
        ("head", "head", True),
        ("head", "head.cls", True),
        ("head", "head#1", True),
        ("head.cls", "head.cls#2", True),
        ("head", "header", False),
        ("head", "header.cls", False),
        ("head.cls", "head", False),
        ("head.c", "head.cls", False),
    ],
)
def test_name_matches_on_components(prefix: str, name: str, expected: bool) -> None:
    assert match_name(prefix, name) is expected


def test_precision_order() -> None:
    assert PRECISION_ORDER == ("qint8", "qint16", "float16", "float32")
    assert [precision_rank(d) for d in (None, qint8, qint16, float16, float32)] == [-1, 0, 1, 2, 3]


def test_template_stages() -> None:
    assert ConvDtypeTemplate(qint8).stage == MatmulDtypeTemplate().stage == Template.TYPE
    assert ModuleNameTemplate({}).stage == Template.NAME
    assert SensitivityTemplate(TABLE, 1).stage == Template.RAISE


def test_conv_template_validation_and_normalisation() -> None:
    t = ConvDtypeTemplate("qint16", torch.float16)
    assert (t.input_dtype, t.weight_dtype) == (qint16, float16)
    with pytest.raises(ValueError, match="input_dtype and/or weight_dtype"):
        ConvDtypeTemplate()
    with pytest.raises(ValueError, match="allowed: qint8, qint16, float16, float32"):
        ConvDtypeTemplate("int4")


def test_matmul_template_one_or_pair() -> None:
    assert MatmulDtypeTemplate(qint16).input_dtypes == (qint16, qint16)
    assert MatmulDtypeTemplate(["qint16", "qint8"]).input_dtypes == (qint16, qint8)
    with pytest.raises(ValueError, match="one dtype or a pair"):
        MatmulDtypeTemplate((qint8, qint8, qint8))


def test_module_name_template_validation() -> None:
    with pytest.raises(ValueError, match="a dtype .* a QConfig, or a dict"):
        ModuleNameTemplate({"x": 3})
    with pytest.raises(ValueError, match="unknown keys \\['scale'\\]; allowed: dtype, output_dtype"):
        ModuleNameTemplate({"x": {"scale": 1.0}})
    with pytest.raises(ValueError, match="'dtype' or 'output_dtype', not both"):
        ModuleNameTemplate({"x": {"dtype": qint8, "output_dtype": qint8}})
    with pytest.raises(ValueError, match="'threshold' or 'fixed_scale'"):
        ModuleNameTemplate({"x": {"dtype": qint8, "threshold": 1.0, "fixed_scale": 0.1}})
    with pytest.raises(ValueError, match="needs an integer 'dtype'"):
        ModuleNameTemplate({"x": {"fixed_scale": 0.1}})
    with pytest.raises(ValueError, match="finite number > 0"):
        ModuleNameTemplate({"x": {"threshold": -1.0}})
    with pytest.raises(ValueError, match="finite number > 0"):
        ModuleNameTemplate({"x": {"threshold": "200"}})
    with pytest.raises(ValueError, match="unknown observer"):
        ModuleNameTemplate({"x": {"observer": "magic"}})
    with pytest.raises(ValueError, match="must be strings"):
        ModuleNameTemplate({1: qint8})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="mapping of op-name prefix"):
        ModuleNameTemplate([("x", qint8)])  # type: ignore[arg-type]


def test_module_name_template_values() -> None:
    ops = [OpInfo("a", "add", OpKind.OTHER, "a"), OpInfo("b.conv", "Conv2d", OpKind.GEMM, "b.conv")]
    full = get_qconfig(in_dtype=qint16, weight_dtype=qint16, out_dtype=float16, observer="kl")
    q = {op.name: get_qconfig() for op in ops}
    ModuleNameTemplate({"a": "fp16", "b": {"input_dtype": (qint16,), "weight_dtype": "int16"}}).apply(ops, q)
    assert q["a"].output_dtype == float16
    assert (q["b.conv"].input_dtype, q["b.conv"].weight_dtype, q["b.conv"].output_dtype) == (
        (qint16,),
        qint16,
        qint8,
    )
    ModuleNameTemplate({"b.conv": full}).apply(ops, q)
    assert q["b.conv"] == full


def test_sensitivity_template_validation() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        SensitivityTemplate([], 1)
    with pytest.raises(ValueError, match="SensitivityTable"):
        SensitivityTemplate([TABLE, "t"], 1)  # type: ignore[list-item]
    for bad in (-0.1, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="count >= 1 or a ratio"):
            SensitivityTemplate(TABLE, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed: None, activation, weight"):
        SensitivityTemplate(TABLE, 1, sensitive_type="act")
    with pytest.raises(ValueError, match="higher than qint8"):
        SensitivityTemplate(TABLE, 1, high_dtype=qint8)
    t = SensitivityTemplate(TABLE, 2.0, high_dtype="fp16")
    assert t.high_dtype == float16 and t.table == (TABLE,)


def test_effective_input_dtypes() -> None:
    ops = [
        OpInfo("q", "quant", OpKind.INPUT, "q"),
        OpInfo("lin", "Linear", OpKind.GEMM, "lin", input_producers=("q",)),
        OpInfo("mm", "matmul", OpKind.GEMM, "mm", input_producers=("lin", None), is_matmul=True),
    ]
    q = {
        "q": get_qconfig(out_dtype=qint16),
        "lin": get_qconfig(in_dtype=float32, out_dtype=float16),  # float32 input = as produced
        "mm": get_qconfig().replace(input_dtype=(None, qint8)),
    }
    assert effective_input_dtypes(ops[0], q) == ()
    assert effective_input_dtypes(ops[1], q) == (qint16,)
    assert effective_input_dtypes(ops[2], q) == (float16, qint8)
    q["mm"] = get_qconfig()
    assert effective_input_dtypes(ops[2], q) == (float16, None)  # second input: no quantized producer
