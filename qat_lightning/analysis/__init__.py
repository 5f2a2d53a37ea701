"""Accuracy debugging and mixed-precision tuning: bad cases, per-layer comparison, sensitivity, search.

Plain torch: never imports lightning, hydra or omegaconf. Callables in (``eval_fn(model) -> float``,
``input_fn(batch)``), frozen result dataclasses out; rendering (text, CSV, JSON, PNG) is separate
(:mod:`~qat_lightning.analysis.reports`, :mod:`~qat_lightning.analysis.plots`).
"""

from qat_lightning.analysis.bad_case import BadCaseResult, BadCaseRow, WorstRow
from qat_lightning.analysis.index_ops import IndexRecorder, IndexReplayer
from qat_lightning.analysis.inputs import default_input_fn, flatten_outputs
from qat_lightning.analysis.layer_compare import Advice, LayerComparison, LayerRow
from qat_lightning.analysis.metrics import BUILTIN_METRICS, Metric
from qat_lightning.analysis.mixed_precision import (
    MixedPrecisionPlan,
    Probe,
    search_mixed_precision,
    write_plan,
)
from qat_lightning.analysis.precision_paths import j6p_base_dtypes, search_fp16_topk, search_j6p
from qat_lightning.analysis.quant_analysis import SENSITIVITY_METHODS, QuantAnalysis

__all__ = [
    "BUILTIN_METRICS",
    "SENSITIVITY_METHODS",
    "Advice",
    "BadCaseResult",
    "BadCaseRow",
    "IndexRecorder",
    "IndexReplayer",
    "LayerComparison",
    "LayerRow",
    "Metric",
    "MixedPrecisionPlan",
    "Probe",
    "QuantAnalysis",
    "WorstRow",
    "default_input_fn",
    "flatten_outputs",
    "j6p_base_dtypes",
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "write_plan",
]
