"""Preparation: a float model becomes a quantized (fake-quant) model, and the check report says how.

``prepare`` picks fx tracing (``fx_tracer``, ``fx_plan``, ``fx_prepare``) or eager call probing
(``eager_prepare``), fuses conv/bn/relu/add groups (``fusion``), builds one quant op per float op
(``build``, with the op tables in ``tables``) and writes the model-check report (``model_check``).
Op records (``OpInfo``, ``iter_quant_ops``) are shared with the rest of the package: ``quant/ops.py``.
"""

from qat_lightning.quant.preparation.model_check import ModelCheckReport, check_model, write_changelog
from qat_lightning.quant.preparation.prepare import PREPARE_METHODS, QAT_MODES, FxTraceError, prepare

__all__ = [
    "PREPARE_METHODS",
    "QAT_MODES",
    "FxTraceError",
    "ModelCheckReport",
    "check_model",
    "prepare",
    "write_changelog",
]
