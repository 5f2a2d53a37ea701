from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import ConvDtypeTemplate, MatmulDtypeTemplate, ModuleNameTemplate

import qat_lightning.chips as chips_module
from qat_lightning.chips import (
    CHIPS,
    ChipSpec,
    dtype_factor,
    dtype_name,
    get_chip,
    model_cost,
    op_cost,
    op_costs,
)
from qat_lightning.quant.dtypes import float16, float32, qint8, qint16
from qat_lightning.quant.ops import OpInfo, OpKind


def test_chip_table() -> None:
    assert set(CHIPS) == {"j6e", "j6m", "j6p"}
    for name in ("j6e", "j6m"):
        spec = CHIPS[name]
        assert spec.gemm_input_dtypes == ("qint8", "qint16") and not spec.gemm_double_int16
        assert "float16" in spec.other_dtypes and not spec.fp16_fast and spec.fp32_ops == ()
    j6p = CHIPS["j6p"]
    assert j6p.gemm_double_int16 and j6p.fp16_fast and "sigmoid" in j6p.fp32_ops
    with pytest.raises(AttributeError):
        j6p.name = "x"  # type: ignore[misc]


def test_get_chip() -> None:
    assert get_chip("J6M") is CHIPS["j6m"]
    assert get_chip(CHIPS["j6p"]) is CHIPS["j6p"]
    with pytest.raises(ValueError, match="unknown chip 'j5'; known chips: j6e, j6m, j6p"):
        get_chip("j5")
    with pytest.raises(ValueError, match="known chips"):
        get_chip(None)  # type: ignore[arg-type]


def test_allows() -> None:
    j6m, j6p = CHIPS["j6m"], CHIPS["j6p"]
    assert j6p.allows_output(float32, "Sigmoid") and not j6p.allows_output(float32, "add")
    assert not j6m.allows_output(float32, "sigmoid") and j6m.allows_output(float16, "add")
    assert j6m.allows_output(None, "add") and j6m.allows_gemm_input(None)
    assert j6m.allows_gemm_input(qint16) and not j6p.allows_gemm_input(float16)


def test_dtype_name_forms() -> None:
    assert [dtype_name(d) for d in (qint8, "qint16", torch.float16, torch.float32, "fp16", None)] == [
        "qint8",
        "qint16",
        "float16",
        "float32",
        "float16",
        None,
    ]
    with pytest.raises(ValueError, match="allowed: qint8, qint16, float16, float32"):
        dtype_factor("int4", "j6m")


def test_op_cost_factors_by_hand() -> None:
    # gemm: product of per-operand factors
    assert op_cost(1000, qint8, qint8, qint8, "j6m", True) == 1000
    assert op_cost(1000, qint16, qint8, qint8, "j6m", True) == 2000
    assert op_cost(1000, qint8, qint16, float16, "j6m", True) == 2000  # a gemm's output does not count
    assert op_cost(1000, qint16, qint16, qint16, "j6p", True) == 4000
    assert op_cost(1000, float16, qint8, qint8, "j6p", True) == 4000  # unsupported: priced as float
    assert op_cost(1000, float16, qint8, qint8, "j6m", True) == 8000
    # non-gemm: widest dtype
    assert op_cost(100, qint8, None, qint8, "j6m", False) == 100
    assert op_cost(100, qint8, None, qint16, "j6m", False) == 200
    assert op_cost(100, None, None, float16, "j6p", False) == 400
    assert op_cost(100, None, None, float16, "j6e", False) == 800
    assert op_cost(100, qint8, None, float32, "j6p", False) == 1600
    assert op_cost(100, None, None, None, "j6p", False) == 100


def test_model_cost_by_hand() -> None:
    ops = [
        OpInfo("q", "quant", OpKind.INPUT, "q", flops=10),
        OpInfo("conv", "Conv2d", OpKind.GEMM, "conv", input_producers=("q",), flops=1000),
        OpInfo("sig", "sigmoid", OpKind.OTHER, "sig", input_producers=("conv",), flops=100),
        OpInfo("mm", "matmul", OpKind.GEMM, "mm", input_producers=("sig", "conv"), flops=500, is_matmul=True),
    ]
    setter = QconfigSetter(
        templates=[
            ModuleNameTemplate({"q": qint16, "sig": float16}),
            ConvDtypeTemplate(weight_dtype=qint8),
            MatmulDtypeTemplate((qint16, qint8)),
        ]
    )
    a = setter.assign(ops)
    # q: int16 output -> 2 * 10; conv: int16 act (from q) x int8 weight -> 2 * 1000;
    # sig: fp16 -> 4 (j6p) / 8 (j6m) * 100; mm: int16 x int8 -> 2 * 500
    assert op_costs(ops, a, "j6p") == {"q": 20.0, "conv": 2000.0, "sig": 400.0, "mm": 1000.0}
    assert model_cost(ops, a, "j6p") == 3420.0
    assert model_cost(ops, a, CHIPS["j6m"]) == 3820.0


def test_chips_module_imports_no_quant_at_runtime() -> None:
    tree = ast.parse(pathlib.Path(chips_module.__file__).read_text())
    runtime_imports = [
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and "qat_lightning" in (getattr(node, "module", "") or "")
    ]
    assert runtime_imports == []
    assert isinstance(CHIPS["j6e"], ChipSpec)
