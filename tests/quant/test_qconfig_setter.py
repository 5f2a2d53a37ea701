from __future__ import annotations

import pytest
import torch

from qat_lightning.compat import (
    ModuleNameQconfigSetter,
    calibration_8bit_weight_16bit_act_qconfig_setter,
    default_calibration_qconfig_setter,
    default_qat_qconfig_setter,
    qat_8bit_weight_16bit_act_qconfig_setter,
    sensitive_op_8bit_weight_16bit_act_calibration_setter,
    sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter,
    sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter,
)
from qat_lightning.quant.dtypes import float16, float32, qint8, qint16
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.qconfig.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable
from qat_lightning.quant.qconfig.setter import QconfigAssignment, QconfigSetter, as_qconfig_setter
from qat_lightning.quant.qconfig.templates import (
    ConvDtypeTemplate,
    MatmulDtypeTemplate,
    ModuleNameTemplate,
    SensitivityTemplate,
)

GEMM, OTHER, INPUT = OpKind.GEMM, OpKind.OTHER, OpKind.INPUT


def make_ops() -> list[OpInfo]:
    """quant -> conv1 -> relu -> head.cls (linear) ; header.fc (linear); head#1 (2nd call of head.cls);
    attn.matmul(relu, conv1); add(relu, quant); sig (sigmoid)."""
    return [
        OpInfo("quant", "quant", INPUT, "quant", flops=100),
        OpInfo("conv1", "Conv2d", GEMM, "conv1", input_producers=("quant",), flops=1000),
        OpInfo("relu", "ReLU", OTHER, "relu", input_producers=("conv1",), flops=100),
        OpInfo("head.cls", "Linear", GEMM, "head.cls", input_producers=("relu",), flops=500),
        OpInfo("head#1", "Linear", GEMM, "head", call_index=1, input_producers=("relu",), flops=500),
        OpInfo("header.fc", "Linear", GEMM, "header.fc", input_producers=("relu",), flops=500),
        OpInfo(
            "attn.matmul",
            "matmul",
            GEMM,
            "attn",
            input_producers=("relu", "conv1"),
            flops=800,
            is_matmul=True,
        ),
        OpInfo("add", "add", OTHER, "add", input_producers=("relu", "quant"), flops=100),
        OpInfo("sig", "sigmoid", OTHER, "sig", input_producers=("add",), flops=100),
    ]


OPS = make_ops()


def table(*rows: tuple[str, str], metric: str = "L1") -> SensitivityTable:
    return SensitivityTable(
        tuple(SensitivityRow(name, kind, "x", 10.0 - i, "qint8") for i, (name, kind) in enumerate(rows)),
        metric_name=metric,
    )


# ------------------------------------------------------------------ defaults and composition


def test_none_is_all_int8_and_every_op_is_assigned() -> None:
    a = as_qconfig_setter(None).assign(OPS)
    assert isinstance(a, QconfigAssignment)
    assert set(a.qconfigs) == {op.name for op in OPS}
    assert all(q == get_qconfig() for q in a.qconfigs.values())
    assert a.changelog == () and a.unmatched == () and a.chip is None


def test_named_setters() -> None:
    assert default_qat_qconfig_setter is default_calibration_qconfig_setter
    assert qat_8bit_weight_16bit_act_qconfig_setter is calibration_8bit_weight_16bit_act_qconfig_setter
    q = default_calibration_qconfig_setter.assign(OPS).qconfigs["conv1"]
    assert (q.output_dtype, q.weight_dtype) == (qint8, qint8)
    q = calibration_8bit_weight_16bit_act_qconfig_setter.assign(OPS).qconfigs["conv1"]
    assert (q.output_dtype, q.weight_dtype) == (qint16, qint8)


def test_seed_tuple_union_of_two_tables_earlier_wins_over_default() -> None:
    t1 = table(("relu", "activation"), ("add", "activation"), ("sig", "activation"), ("quant", "activation"))
    t2 = table(("sig", "activation"), ("quant", "activation"), ("relu", "activation"), ("add", "activation"))
    setter = as_qconfig_setter(
        (
            sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter(t1, ratio=0.25),
            sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter(t2, ratio=0.25),
            default_calibration_qconfig_setter,
        )
    )
    a = setter.assign(OPS)
    raised = {n for n, q in a.qconfigs.items() if q.output_dtype == qint16}
    assert raised == {"relu", "sig"}  # top 25% (1 of 4 rows) of each table, unioned
    assert a.qconfigs["conv1"].weight_dtype == qint8


def test_seed_module_name_qconfig_setter_before_16bit_default() -> None:
    fp16 = get_qconfig(in_dtype=torch.float16, weight_dtype=torch.float16, out_dtype=torch.float16)
    a = as_qconfig_setter(
        (ModuleNameQconfigSetter({"add": fp16}), qat_8bit_weight_16bit_act_qconfig_setter)
    ).assign(OPS)
    assert a.qconfigs["add"] == fp16
    assert a.qconfigs["relu"].output_dtype == qint16 and a.qconfigs["relu"].weight_dtype == qint8


def test_tuple_earlier_entry_wins() -> None:
    a = as_qconfig_setter(
        (ModuleNameQconfigSetter({"relu": qint16}), ModuleNameQconfigSetter({"relu": float16}))
    ).assign(OPS)
    assert a.qconfigs["relu"].output_dtype == qint16
    # the earliest explicit reference qconfig is the base
    a = as_qconfig_setter(
        (default_calibration_qconfig_setter, calibration_8bit_weight_16bit_act_qconfig_setter)
    ).assign(OPS)
    assert a.qconfigs["relu"].output_dtype == qint8


def test_seed_alias_and_qat_twin() -> None:
    t = table(("relu", "activation"))
    for f in (
        sensitive_op_8bit_weight_16bit_act_calibration_setter,
        sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter,
    ):
        assert f(t, 1).assign(OPS).qconfigs["relu"].output_dtype == qint16


def test_as_qconfig_setter_rejects_and_overrides() -> None:
    with pytest.raises(TypeError, match="QconfigSetter, a template, a QConfig, a tuple/list"):
        as_qconfig_setter("int8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a QconfigSetter or template"):
        as_qconfig_setter((default_calibration_qconfig_setter, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        as_qconfig_setter(())
    with pytest.raises(ValueError, match="different chips"):
        as_qconfig_setter((QconfigSetter(chip="j6m"), QconfigSetter(chip="j6p")))
    q16 = get_qconfig(out_dtype=qint16)
    assert as_qconfig_setter(q16).assign(OPS).qconfigs["add"] == q16
    a = as_qconfig_setter((ModuleNameTemplate({"add": float16}), q16)).assign(OPS)
    assert (a.qconfigs["add"].output_dtype, a.qconfigs["relu"].output_dtype) == (float16, qint16)
    s = as_qconfig_setter(ConvDtypeTemplate(qint16, qint8), chip="j6m", on_violation="downgrade")
    assert (s.chip, s.on_violation) == ("j6m", "downgrade")
    assert s.assign(OPS).qconfigs["conv1"].input_dtype == qint16
    s = as_qconfig_setter((QconfigSetter(chip="J6P", on_violation="downgrade"), default_qat_qconfig_setter))
    assert (s.chip, s.on_violation) == ("j6p", "downgrade")


def test_setter_argument_validation() -> None:
    with pytest.raises(ValueError, match="j6e, j6m, j6p"):
        QconfigSetter(chip="j7")
    with pytest.raises(ValueError, match="error, downgrade"):
        QconfigSetter(on_violation="ignore")
    with pytest.raises(TypeError, match="wrap it in"):
        QconfigSetter(templates=ConvDtypeTemplate(qint16))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ModuleNameTemplate"):
        QconfigSetter(templates=[{"": qint16}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="QConfig"):
        QconfigSetter(reference_qconfig="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate op names: relu"):
        QconfigSetter().assign([*OPS, OPS[2]])


# ------------------------------------------------------------------ precedence


def test_type_templates_later_overrides_earlier_field_by_field() -> None:
    s = QconfigSetter(templates=[ConvDtypeTemplate(qint16, qint16), ConvDtypeTemplate(input_dtype=qint8)])
    q = s.assign(OPS).qconfigs["conv1"]
    assert (q.input_dtype, q.weight_dtype) == (qint8, qint16)


def test_name_beats_type_regardless_of_order() -> None:
    pinned = get_qconfig(in_dtype=qint8, weight_dtype=qint8, out_dtype=qint8)
    for templates in (
        [ModuleNameTemplate({"conv1": pinned}), ConvDtypeTemplate(qint16, qint16)],
        [ConvDtypeTemplate(qint16, qint16), ModuleNameTemplate({"conv1": pinned})],
    ):
        a = QconfigSetter(templates=templates).assign(OPS)
        assert a.qconfigs["conv1"] == pinned
        assert (a.qconfigs["head.cls"].input_dtype, a.qconfigs["head.cls"].weight_dtype) == (qint16, qint16)


def test_bare_dtype_sets_output_only_seed_j6p_example() -> None:
    s = QconfigSetter(
        reference_qconfig=get_qconfig(),
        templates=[
            ModuleNameTemplate({"": torch.float16}),
            ConvDtypeTemplate(input_dtype=qint16, weight_dtype=qint16),
            MatmulDtypeTemplate(input_dtypes=qint16),
        ],
        chip="j6p",
    )
    a = s.assign(OPS)
    conv = a.qconfigs["conv1"]
    assert (conv.input_dtype, conv.weight_dtype, conv.output_dtype) == (qint16, qint16, float16)
    assert a.qconfigs["attn.matmul"].input_dtype == (qint16, qint16)
    assert a.qconfigs["add"].output_dtype == float16
    assert a.changelog == ()  # j6p: double int16 gemm and fp16 non-gemm are fine


def test_name_templates_later_overrides_earlier_field_by_field() -> None:
    s = QconfigSetter(
        templates=[
            ModuleNameTemplate({"relu": {"dtype": qint16, "observer": "kl"}}),
            ModuleNameTemplate({"relu": float16}),
        ]
    )
    q = s.assign(OPS).qconfigs["relu"]
    assert (q.output_dtype, q.observer) == (float16, "kl")


def test_longer_prefix_wins_and_shorter_fields_cascade() -> None:
    s = QconfigSetter(
        templates=[ModuleNameTemplate({"head.cls": qint8, "": qint16, "head": {"threshold": 2.0}})]
    )
    a = s.assign(OPS)
    assert a.qconfigs["head.cls"].output_dtype == qint8  # most specific
    assert a.qconfigs["head.cls"].fixed_threshold == 2.0  # from "head", not overridden by "head.cls"
    assert a.qconfigs["head#1"].output_dtype == qint16 and a.qconfigs["head#1"].fixed_threshold == 2.0
    assert a.qconfigs["header.fc"].fixed_threshold is None  # "head" does not match "header"
    assert a.qconfigs["relu"].output_dtype == qint16


def test_prefix_matching_on_components() -> None:
    a = QconfigSetter(templates=[ModuleNameTemplate({"head": qint16})]).assign(OPS)
    got = {n for n, q in a.qconfigs.items() if q.output_dtype == qint16}
    assert got == {"head.cls", "head#1"}


def test_fixed_threshold_and_fixed_scale_via_dict() -> None:
    s = QconfigSetter(
        templates=[
            ModuleNameTemplate(
                {
                    "quant": {"threshold": 200.0},
                    "add": {"dtype": "qint16", "threshold": 2.0},
                    "sig": {"dtype": "qint8", "fixed_scale": 1 / 128},
                }
            )
        ]
    )
    a = s.assign(OPS)
    assert a.qconfigs["quant"].fixed_threshold == 200.0 and a.qconfigs["quant"].output_dtype == qint8
    assert (a.qconfigs["add"].output_dtype, a.qconfigs["add"].fixed_threshold) == (qint16, 2.0)
    assert a.qconfigs["sig"].fixed_threshold == pytest.approx(127 / 128)


def test_per_input_matmul_dtypes_and_effective_inputs() -> None:
    s = QconfigSetter(templates=[MatmulDtypeTemplate((qint16, qint8)), ModuleNameTemplate({"relu": qint16})])
    a = s.assign(OPS)
    assert a.qconfigs["attn.matmul"].input_dtype == (qint16, qint8)
    by = {op.name: op for op in OPS}
    assert a.input_dtypes(by["attn.matmul"]) == (qint16, qint8)
    assert a.input_dtypes(by["head.cls"]) == (qint16,)  # left as produced: relu's output
    assert a.input_dtypes(by["add"]) == (qint16, qint8)
    assert a.input_dtypes(by["quant"]) == ()


def test_unmatched_names_reported() -> None:
    t = table(("gone.op", "activation"), ("relu", "activation"))
    s = QconfigSetter(
        templates=[
            ModuleNameTemplate({"nope": qint16, "head": qint16, "hea": qint16}),
            SensitivityTemplate(t, 2),
        ]
    )
    assert s.assign(OPS).unmatched == ("nope", "hea", "gone.op")


# ------------------------------------------------------------------ sensitivity


def test_sensitivity_applied_last_and_only_raises() -> None:
    t = table(("relu", "activation"), ("add", "activation"), ("head.cls", "activation"), ("conv1", "weight"))
    s = QconfigSetter(
        templates=[
            SensitivityTemplate(t, topk_or_ratio=4),
            ModuleNameTemplate({"add": float16, "relu": qint8}),  # name set later still gets raised
        ]
    )
    a = s.assign(OPS)
    assert a.qconfigs["relu"].output_dtype == qint16
    assert a.qconfigs["add"].output_dtype == float16  # already above qint16: stays fp16
    cls = a.qconfigs["head.cls"]
    # its producer relu was raised to qint16, so its input (left as produced) needs no explicit dtype
    assert (cls.input_dtype, cls.output_dtype, cls.weight_dtype) == (None, qint16, qint8)
    assert a.input_dtypes(OPS[3]) == (qint16,)
    conv = a.qconfigs["conv1"]
    assert (conv.weight_dtype, conv.output_dtype) == (qint16, qint8)


def test_sensitivity_gemm_input_not_set_when_producer_already_high() -> None:
    t = table(("head.cls", "activation"), ("attn.matmul", "activation"))
    s = QconfigSetter(templates=[ModuleNameTemplate({"relu": qint16}), SensitivityTemplate(t, 2)])
    a = s.assign(OPS)
    assert a.qconfigs["head.cls"].input_dtype is None  # relu output is qint16 already
    assert a.qconfigs["attn.matmul"].input_dtype == (None, qint16)  # conv1 output qint8 -> raised


def test_sensitivity_ratio_topk_type_filter_and_union() -> None:
    t1 = table(("relu", "activation"), ("conv1", "weight"), ("add", "activation"), ("sig", "activation"))
    t2 = table(("quant", "activation"), ("relu", "activation"))
    q = QconfigSetter(templates=[SensitivityTemplate(t1, 0.5)]).assign(OPS).qconfigs
    assert q["relu"].output_dtype == qint16 and q["conv1"].weight_dtype == qint16
    assert q["add"].output_dtype == qint8
    q = (
        QconfigSetter(templates=[SensitivityTemplate(t1, 2, sensitive_type="activation")])
        .assign(OPS)
        .qconfigs
    )
    assert {n for n, c in q.items() if c.output_dtype == qint16} == {"relu", "add"}
    assert q["conv1"].weight_dtype == qint8
    q = QconfigSetter(templates=[SensitivityTemplate([t1, t2], 1, high_dtype=float16)]).assign(OPS).qconfigs
    assert {n for n, c in q.items() if c.output_dtype == float16} == {"relu", "quant"}


# ------------------------------------------------------------------ chip rules


def double_int16_setter(chip: str, on_violation: str = "error") -> QconfigSetter:
    return QconfigSetter(
        templates=[ConvDtypeTemplate(qint16, qint16), MatmulDtypeTemplate(qint16)],
        chip=chip,
        on_violation=on_violation,
    )


def test_j6m_double_int16_error_names_every_op() -> None:
    with pytest.raises(ValueError) as err:
        double_int16_setter("j6m").assign(OPS)
    msg = str(err.value)
    for name in ("conv1", "head.cls", "head#1", "header.fc", "attn.matmul"):
        assert f"  {name}: " in msg
    assert "j6m: gemm cannot take int16 on both activation and weight" in msg
    assert "j6m: matmul cannot take int16 on both inputs" in msg
    assert "on_violation='downgrade'" in msg


def test_j6m_double_int16_downgrade_with_changelog() -> None:
    a = double_int16_setter("j6m", "downgrade").assign(OPS)
    assert a.qconfigs["conv1"].weight_dtype == qint8 and a.qconfigs["conv1"].input_dtype == qint16
    assert a.qconfigs["attn.matmul"].input_dtype == (qint16, qint8)
    rule = "j6m: gemm cannot take int16 on both activation and weight"
    assert a.changelog == (
        f"conv1: weight qint16 -> qint8 ({rule})",
        f"head.cls: weight qint16 -> qint8 ({rule})",
        f"head#1: weight qint16 -> qint8 ({rule})",
        f"header.fc: weight qint16 -> qint8 ({rule})",
        "attn.matmul: input.1 qint16 -> qint8 (j6m: matmul cannot take int16 on both inputs)",
    )


def test_j6e_double_int16_through_producer_output() -> None:
    s = QconfigSetter(
        templates=[ModuleNameTemplate({"relu": qint16, "head.cls": {"weight_dtype": qint16}})], chip="j6e"
    )
    with pytest.raises(ValueError, match=r"head.cls: weight is qint16"):
        s.assign(OPS)


def test_j6p_double_int16_ok() -> None:
    a = double_int16_setter("j6p").assign(OPS)
    assert a.changelog == () and a.qconfigs["conv1"].weight_dtype == qint16


@pytest.mark.parametrize("chip", ["j6e", "j6m", "j6p"])
def test_fp16_gemm_unsupported(chip: str) -> None:
    s = QconfigSetter(templates=[ModuleNameTemplate({"quant": float16})], chip=chip)
    with pytest.raises(ValueError, match=rf"conv1: input.0 is float16 \(from quant\) \({chip}: gemm inputs"):
        s.assign(OPS)
    a = s.with_chip(chip, "downgrade").assign(OPS)
    assert a.qconfigs["conv1"].input_dtype == qint16
    assert a.changelog[0].startswith("conv1: input.0 float16 (from quant) -> qint16 (")


def test_fp16_weight_downgrade_cascades_on_j6m_not_reported_as_error() -> None:
    fp16 = get_qconfig(in_dtype=qint16, weight_dtype=float16)
    s = QconfigSetter(templates=[ModuleNameTemplate({"conv1": fp16})], chip="j6m")
    with pytest.raises(ValueError) as err:
        s.assign(OPS)
    assert "conv1: weight is float16" in str(err.value) and "both activation" not in str(err.value)
    a = s.with_chip("j6m", "downgrade").assign(OPS)
    assert a.qconfigs["conv1"].weight_dtype == qint8
    assert [line.split(" (")[0] for line in a.changelog] == [
        "conv1: weight float16 -> qint16",
        "conv1: weight qint16 -> qint8",
    ]


def test_fp32_only_for_listed_ops() -> None:
    s = QconfigSetter(templates=[ModuleNameTemplate({"sig": float32})], chip="j6p")
    assert s.assign(OPS).changelog == ()
    with pytest.raises(ValueError, match="j6m: float32 output not supported"):
        s.with_chip("j6m").assign(OPS)
    s = QconfigSetter(templates=[ModuleNameTemplate({"add": float32})], chip="j6p", on_violation="downgrade")
    a = s.assign(OPS)
    assert a.qconfigs["add"].output_dtype == float16
    assert a.changelog == (
        "add: output float32 -> float16 (j6p: float32 output only for sigmoid, tanh, exp, log, softmax)",
    )


def test_fp16_non_gemm_allowed_on_j6m() -> None:
    s = QconfigSetter(
        templates=[
            ModuleNameTemplate({"add": float16, "relu": float16}),
            ConvDtypeTemplate(input_dtype=qint8),
            MatmulDtypeTemplate(qint8),
        ],
        chip="j6m",
    )
    a = s.assign(OPS)
    assert a.changelog == () and a.qconfigs["add"].output_dtype == float16


def test_qconfig_objects_are_qconfig() -> None:
    a = double_int16_setter("j6p").assign(OPS)
    assert all(isinstance(q, QConfig) for q in a.qconfigs.values())
    with pytest.raises(TypeError):
        a.qconfigs["x"] = get_qconfig()  # type: ignore[index]


CONV_ADD_OPS = [
    OpInfo("x", "quant", INPUT, "x"),
    OpInfo("res", "quant", INPUT, "res"),
    OpInfo("conv", "ConvBnAddReLU2d", GEMM, "conv", input_producers=("x", "res")),
]


@pytest.mark.parametrize("chip", ["j6e", "j6m"])
def test_conv_add_residual_operand_is_not_the_gemm_activation(chip: str) -> None:
    # int8 conv input + int16 weight + int16 add operand: the add operand is not multiplied by the weight
    names = {"res": qint16, "conv": {"weight_dtype": qint16}}
    a = QconfigSetter(templates=[ModuleNameTemplate(names)], chip=chip).assign(CONV_ADD_OPS)
    assert a.changelog == () and a.qconfigs["conv"].weight_dtype == qint16


@pytest.mark.parametrize("chip", ["j6e", "j6m"])
def test_conv_add_int16_activation_and_weight_still_refused(chip: str) -> None:
    names = {"x": qint16, "conv": {"weight_dtype": qint16}}
    with pytest.raises(ValueError, match=r"conv: weight is qint16 .*both activation and weight"):
        QconfigSetter(templates=[ModuleNameTemplate(names)], chip=chip).assign(CONV_ADD_OPS)
    a = QconfigSetter(templates=[ModuleNameTemplate(names)], chip=chip, on_violation="downgrade")
    assert a.assign(CONV_ADD_OPS).qconfigs["conv"].weight_dtype == qint8
