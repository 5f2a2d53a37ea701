"""Plain-torch quantization core: dtypes, fake quant/cast, observers, qconfig, prepare, model check.

Sub-packages: ``qconfig`` (QConfig, templates, QconfigSetter, sensitivity table), ``preparation``
(prepare, fx/eager preparation, fusion, model check). The seed's named setters live in
:mod:`qat_lightning.compat`.

Never imports lightning, hydra or omegaconf.
"""

from qat_lightning.quant.backends import BACKENDS, get_backend, set_backend
from qat_lightning.quant.calibrate import (
    CALIBRATED_FLAG,
    UncalibratedModelError,
    calibrate,
    reduce_observer_statistics,
    require_calibrated,
)
from qat_lightning.quant.dtypes import DTYPES, QuantDtype, float16, float32, parse_dtype, qint8, qint16
from qat_lightning.quant.nodes import (
    SCALE_MODES,
    FakeCast,
    FakeQuantize,
    FakeQuantState,
    fake_quant_disabled,
    fake_quant_state,
    frozen_parameters,
    iter_fake_quantize,
    set_fake_quantize,
    set_qat_scales,
)
from qat_lightning.quant.nodes.fp16_norm import set_fp16_norm_scaling
from qat_lightning.quant.nodes.functional import fake_cast, fake_quantize
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch
from qat_lightning.quant.observers import OBSERVER_NAMES, Observer, make_observer
from qat_lightning.quant.ops import FloatOp, OpInfo, OpKind, PrepareRecord, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.preparation import (
    PREPARE_METHODS,
    QAT_MODES,
    EagerFused,
    FxTraceError,
    ModelCheckReport,
    check_model,
    dynamic_block,
    fuse_modules,
    not_quantized_share,
    prepare,
    write_changelog,
)
from qat_lightning.quant.qat import find_lr_warmup, freeze_batchnorm, io_quant_nodes
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

__all__ = [
    "EagerFused",
    "FloatOp",
    "dynamic_block",
    "not_quantized_share",
    "fuse_modules",
    "CALIBRATED_FLAG",
    "UncalibratedModelError",
    "calibrate",
    "find_lr_warmup",
    "freeze_batchnorm",
    "io_quant_nodes",
    "reduce_observer_statistics",
    "require_calibrated",
    "BACKENDS",
    "get_backend",
    "set_backend",
    "set_qat_scales",
    "SCALE_MODES",
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
    "frozen_parameters",
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
