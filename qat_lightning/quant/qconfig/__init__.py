"""Qconfigs: what each op's quant points are, and the rules that set them.

``QConfig``: what each op's quant points are (``QConfig``), the rules that assign them (templates, the
``QconfigSetter`` with its chip rules), the sensitivity table that drives raising, and the cost of an
assignment on a chip.
"""

from qat_lightning.quant.qconfig.costs import model_cost, op_costs
from qat_lightning.quant.qconfig.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES, SensitivityRow, SensitivityTable
from qat_lightning.quant.qconfig.setter import (
    ON_VIOLATION,
    ChipIssue,
    QconfigAssignment,
    QconfigSetter,
    as_qconfig_setter,
    chip_issues,
)
from qat_lightning.quant.qconfig.templates import (
    PRECISION_ORDER,
    ConvDtypeTemplate,
    MatmulDtypeTemplate,
    ModuleNameTemplate,
    SensitivityTemplate,
    Template,
    precision_rank,
)

__all__ = [
    "ON_VIOLATION",
    "PRECISION_ORDER",
    "SENSITIVE_TYPES",
    "ChipIssue",
    "ConvDtypeTemplate",
    "MatmulDtypeTemplate",
    "ModuleNameTemplate",
    "QConfig",
    "QconfigAssignment",
    "QconfigSetter",
    "SensitivityRow",
    "SensitivityTable",
    "SensitivityTemplate",
    "Template",
    "as_qconfig_setter",
    "chip_issues",
    "get_qconfig",
    "model_cost",
    "op_costs",
    "precision_rank",
]
