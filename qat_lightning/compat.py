"""The seed's named qconfig setters, kept for code written against the seed (``qat_lightning.compat``).

In this package calibration and QAT differ by the ``FakeQuantState``, not by the qconfig, so each
calibration/QAT pair is the same object. New code builds a :class:`~qat_lightning.quant.QconfigSetter`
from templates instead. These names left the root namespace (``qat_lightning``) in the issue-16 layout;
``ql.<name>`` still resolves them through :func:`qat_lightning.__getattr__`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qat_lightning.quant.dtypes import qint8, qint16
from qat_lightning.quant.qconfig.qconfig import get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import ModuleNameTemplate, SensitivityTemplate

__all__ = [
    "ModuleNameQconfigSetter",
    "calibration_8bit_weight_16bit_act_qconfig_setter",
    "default_calibration_qconfig_setter",
    "default_qat_qconfig_setter",
    "qat_8bit_weight_16bit_act_qconfig_setter",
    "sensitive_op_8bit_weight_16bit_act_calibration_setter",
    "sensitive_op_8bit_weight_16bit_act_qat_setter",
    "sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter",
    "sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter",
]

#: All int8 (activations and weights), the configured activation observer (``mse``).
default_calibration_qconfig_setter = QconfigSetter(reference_qconfig=get_qconfig())
#: Same object as :data:`default_calibration_qconfig_setter`.
default_qat_qconfig_setter = default_calibration_qconfig_setter
#: Activations (op outputs) qint16, weights qint8.
calibration_8bit_weight_16bit_act_qconfig_setter = QconfigSetter(
    reference_qconfig=get_qconfig(weight_dtype=qint8, out_dtype=qint16)
)
#: Same object as :data:`calibration_8bit_weight_16bit_act_qconfig_setter`.
qat_8bit_weight_16bit_act_qconfig_setter = calibration_8bit_weight_16bit_act_qconfig_setter


def sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter(
    table: SensitivityTable | Sequence[SensitivityTable], ratio: float = 0.2
) -> QconfigSetter:
    """Raise the top ``ratio`` of each table's ``activation`` rows to qint16 activations (weights unchanged).

    A setter part with no reference qconfig: compose it before a default setter, seed style
    ``(sensitive_op_..._setter(t1, ratio=0.2), sensitive_op_..._setter(t2, ratio=0.2),
    default_calibration_qconfig_setter)``; alone it raises ops of the all-int8 default.

    Args:
        table: one sensitivity table or a list (the union of each table's top share is raised).
        ratio: share of rows in ``[0, 1)``, or a count ``>= 1``.
    """
    return QconfigSetter(templates=(SensitivityTemplate(table, ratio, "activation", qint16),))


def sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter(
    table: SensitivityTable | Sequence[SensitivityTable], ratio: float = 0.2
) -> QconfigSetter:
    """QAT twin of :func:`sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter` (identical)."""
    return sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter(table, ratio)


#: The seed's alternative spellings.
sensitive_op_8bit_weight_16bit_act_calibration_setter = (
    sensitive_op_calibration_8bit_weight_16bit_act_qconfig_setter
)
sensitive_op_8bit_weight_16bit_act_qat_setter = sensitive_op_qat_8bit_weight_16bit_act_qconfig_setter


def ModuleNameQconfigSetter(mapping: Mapping[str, Any]) -> QconfigSetter:  # noqa: N802 - the seed's name
    """Build the seed's ``ModuleNameQconfigSetter``: a setter part holding one :class:`ModuleNameTemplate`.

    Args:
        mapping: op-name prefix -> dtype, QConfig or dict (see :class:`ModuleNameTemplate`).
    """
    return QconfigSetter(templates=(ModuleNameTemplate(mapping),))
