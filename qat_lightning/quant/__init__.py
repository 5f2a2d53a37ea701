"""Plain-torch quantization core: dtypes, fake quant/cast, observers, qconfig, prepare, model check.

Never imports lightning, hydra or omegaconf.
"""

from qat_lightning.quant.backends import BACKENDS, get_backend, set_backend
from qat_lightning.quant.dtypes import DTYPES, QuantDtype, float16, float32, parse_dtype, qint8, qint16
from qat_lightning.quant.nodes import (
    SCALE_MODES,
    FakeCast,
    FakeQuantize,
    FakeQuantState,
    fake_quant_disabled,
    fake_quant_state,
    iter_fake_quantize,
    set_fake_quantize,
    set_qat_scales,
)
from qat_lightning.quant.nodes.fp16_norm import set_fp16_norm_scaling
from qat_lightning.quant.nodes.functional import fake_cast, fake_quantize
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch
from qat_lightning.quant.observers import OBSERVER_NAMES, Observer, make_observer
from qat_lightning.quant.ops import OpInfo, OpKind, PrepareRecord, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.preparation.model_check import ModelCheckReport, check_model, write_changelog
from qat_lightning.quant.preparation.prepare import PREPARE_METHODS, QAT_MODES, FxTraceError, prepare
from qat_lightning.quant.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable
from qat_lightning.quant.qconfig.setter import (
    ModuleNameQconfigSetter,
    QconfigAssignment,
    QconfigSetter,
    as_qconfig_setter,
    calibration_8bit_weight_16bit_act_qconfig_setter,
    default_calibration_qconfig_setter,
    default_qat_qconfig_setter,
    qat_8bit_weight_16bit_act_qconfig_setter,
    sensitive_op_8bit_weight_16bit_act_calibration_setter,
    sensitive_op_8bit_weight_16bit_act_qat_setter,
    sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter,
    sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter,
)
from qat_lightning.quant.qconfig.templates import (
    ConvDtypeTemplate,
    MatmulDtypeTemplate,
    ModuleNameTemplate,
    SensitivityTemplate,
)

__all__ = [
    "BACKENDS",
    "get_backend",
    "set_backend",
    "PREPARE_METHODS",
    "QAT_MODES",
    "ConvDtypeTemplate",
    "FxTraceError",
    "MatmulDtypeTemplate",
    "ModelCheckReport",
    "ModuleNameQconfigSetter",
    "ModuleNameTemplate",
    "PrepareRecord",
    "QconfigAssignment",
    "QconfigSetter",
    "SensitivityRow",
    "SensitivityTable",
    "SensitivityTemplate",
    "as_qconfig_setter",
    "calibration_8bit_weight_16bit_act_qconfig_setter",
    "check_model",
    "default_calibration_qconfig_setter",
    "default_qat_qconfig_setter",
    "prepare",
    "qat_8bit_weight_16bit_act_qconfig_setter",
    "sensitive_op_8bit_weight_16bit_act_calibration_setter",
    "sensitive_op_8bit_weight_16bit_act_qat_setter",
    "sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter",
    "sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter",
    "write_changelog",
    "DTYPES",
    "OBSERVER_NAMES",
    "FakeCast",
    "FakeQuantState",
    "FakeQuantize",
    "GlobalFakeQuantSwitch",
    "Observer",
    "OpInfo",
    "OpKind",
    "QConfig",
    "QuantDtype",
    "fake_cast",
    "fake_quant_disabled",
    "fake_quant_state",
    "fake_quantize",
    "float16",
    "float32",
    "get_qconfig",
    "iter_fake_quantize",
    "iter_quant_ops",
    "make_observer",
    "parse_dtype",
    "qint8",
    "qint16",
    "quant_nodes_of",
    "set_fake_quantize",
    "set_qat_scales",
    "SCALE_MODES",
    "set_fp16_norm_scaling",
]
