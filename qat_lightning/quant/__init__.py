"""Plain-torch quantization core: dtypes, fake quant/cast, observers, qconfig, prepare, model check.

Sub-packages: ``qconfig`` (QConfig, templates, QconfigSetter, sensitivity table), ``preparation``
(prepare, fx/eager preparation, fusion, model check). The seed's named setters live in
:mod:`qat_lightning.compat`.

Never imports lightning, hydra or omegaconf.
"""

from qat_lightning.quant.dtypes import DTYPES, QuantDtype, float16, float32, parse_dtype, qint8, qint16
from qat_lightning.quant.fake_quantize import (
    FakeCast,
    FakeQuantize,
    FakeQuantState,
    fake_quant_disabled,
    fake_quant_state,
    iter_fake_quantize,
    set_fake_quantize,
)
from qat_lightning.quant.fp16_norm import set_fp16_norm_scaling
from qat_lightning.quant.functional import fake_cast, fake_quantize
from qat_lightning.quant.observers import OBSERVER_NAMES, Observer, make_observer
from qat_lightning.quant.ops import OpInfo, OpKind, PrepareRecord, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.preparation import (
    PREPARE_METHODS,
    QAT_MODES,
    FxTraceError,
    ModelCheckReport,
    check_model,
    prepare,
    write_changelog,
)
from qat_lightning.quant.qconfig import (
    ConvDtypeTemplate,
    MatmulDtypeTemplate,
    ModuleNameTemplate,
    QConfig,
    QconfigAssignment,
    QconfigSetter,
    SensitivityRow,
    SensitivityTable,
    SensitivityTemplate,
    as_qconfig_setter,
    get_qconfig,
)
from qat_lightning.quant.switches import GlobalFakeQuantSwitch

__all__ = [
    "PREPARE_METHODS",
    "QAT_MODES",
    "ConvDtypeTemplate",
    "FxTraceError",
    "MatmulDtypeTemplate",
    "ModelCheckReport",
    "ModuleNameTemplate",
    "PrepareRecord",
    "QconfigAssignment",
    "QconfigSetter",
    "SensitivityRow",
    "SensitivityTable",
    "SensitivityTemplate",
    "as_qconfig_setter",
    "check_model",
    "prepare",
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
    "set_fp16_norm_scaling",
]
