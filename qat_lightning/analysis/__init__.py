"""Accuracy debugging and mixed-precision tuning: bad cases, per-layer comparison, sensitivity, search.

Plain torch: never imports lightning, hydra or omegaconf. Callables in (``eval_fn(model) -> float``,
``input_fn(batch)``), frozen result dataclasses out; rendering (text, CSV, JSON, PNG) is separate
(:mod:`~qat_lightning.analysis.reports`, :mod:`~qat_lightning.analysis.reports.plots`).
"""

from qat_lightning.analysis.advice.fp16 import Fp16Diagnosis, diagnose_fp16, render_fp16
from qat_lightning.analysis.advice.int16 import DualInt16Diagnosis, diagnose_dual_int16, render_dual_int16
from qat_lightning.analysis.advice.lr import LrProbeResult, probe_qat_lr, render_lr_probe
from qat_lightning.analysis.advice.shared import (
    SharedModuleAdvice,
    render_shared_module_advice,
    shared_module_advice,
)
from qat_lightning.analysis.compare.bad_case import BadCaseResult, BadCaseRow, WorstRow
from qat_lightning.analysis.compare.index_ops import IndexRecorder, IndexReplayer
from qat_lightning.analysis.compare.layer_compare import Advice, LayerComparison, LayerRow
from qat_lightning.analysis.compare.metrics import BUILTIN_METRICS, Metric
from qat_lightning.analysis.inputs import default_input_fn, flatten_outputs
from qat_lightning.analysis.mixed_precision import (
    MixedPrecisionPlan,
    Probe,
    search_mixed_precision,
    write_plan,
)
from qat_lightning.analysis.quant_analysis import SENSITIVITY_METHODS, QuantAnalysis
from qat_lightning.analysis.search.precision_paths import j6p_base_dtypes, search_fp16_topk, search_j6p

__all__ = [
    "BUILTIN_METRICS",
    "SENSITIVITY_METHODS",
    "Advice",
    "BadCaseResult",
    "BadCaseRow",
    "DualInt16Diagnosis",
    "Fp16Diagnosis",
    "IndexRecorder",
    "IndexReplayer",
    "LayerComparison",
    "LayerRow",
    "LrProbeResult",
    "Metric",
    "MixedPrecisionPlan",
    "Probe",
    "QuantAnalysis",
    "SharedModuleAdvice",
    "WorstRow",
    "default_input_fn",
    "diagnose_dual_int16",
    "diagnose_fp16",
    "flatten_outputs",
    "j6p_base_dtypes",
    "probe_qat_lr",
    "render_dual_int16",
    "render_fp16",
    "render_lr_probe",
    "render_shared_module_advice",
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "shared_module_advice",
    "write_plan",
]
