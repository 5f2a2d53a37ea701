"""Plain-torch quantization core: dtypes, fake quant/cast, observers, qconfig, prepare, model check.

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
from qat_lightning.quant.functional import fake_cast, fake_quantize
from qat_lightning.quant.observers import OBSERVER_NAMES, Observer, make_observer
from qat_lightning.quant.ops import OpInfo, OpKind, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.qconfig import QConfig, get_qconfig
from qat_lightning.quant.switches import GlobalFakeQuantSwitch

__all__ = [
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
]
