"""The seed's named setters live in ``qat_lightning.compat`` and still resolve as ``ql.<name>``."""

from __future__ import annotations

import pytest

import qat_lightning as ql
import qat_lightning.quant as quant
from qat_lightning import compat
from qat_lightning.quant.dtypes import qint8, qint16
from qat_lightning.quant.ops import OpInfo, OpKind

#: DESIGN.md's public API (``ql.<name>``): must keep working whatever moves inside the package.
DESIGN_NAMES = (
    "qint8 qint16 float16 float32 fake_quantize FakeQuantize set_fake_quantize FakeQuantState get_qconfig "
    "QconfigSetter ModuleNameTemplate ConvDtypeTemplate MatmulDtypeTemplate SensitivityTemplate prepare "
    "fake_quant_disabled GlobalFakeQuantSwitch FakeCast QuantAnalysis search_mixed_precision"
).split()


@pytest.mark.parametrize("name", compat.__all__)
def test_compat_names_resolve_from_the_root_but_left_its_namespace(name: str) -> None:
    assert getattr(ql, name) is getattr(compat, name)
    assert name not in ql.__all__ and name not in dir(ql)
    assert name not in quant.__all__ and not hasattr(quant, name)


def test_unknown_root_attribute_still_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = ql.not_a_name


def test_design_api_names_exist() -> None:
    assert [n for n in DESIGN_NAMES if not hasattr(ql, n)] == []
    assert set(DESIGN_NAMES) <= set(ql.__all__)


def test_seed_setters_assign_what_their_names_say() -> None:
    ops = [
        OpInfo("quant", "quant", OpKind.INPUT, "quant"),
        OpInfo("conv", "Conv2d", OpKind.GEMM, "conv", input_producers=("quant",)),
    ]
    q8 = ql.default_calibration_qconfig_setter.assign(ops).qconfigs["conv"]
    q16 = ql.calibration_8bit_weight_16bit_act_qconfig_setter.assign(ops).qconfigs["conv"]
    assert (q8.output_dtype, q8.weight_dtype) == (qint8, qint8)
    assert (q16.output_dtype, q16.weight_dtype) == (qint16, qint8)
    assert ql.default_qat_qconfig_setter is ql.default_calibration_qconfig_setter
