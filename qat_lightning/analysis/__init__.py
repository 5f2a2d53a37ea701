"""Accuracy debugging and mixed-precision tuning: bad cases, per-layer comparison, sensitivity, search.

Plain torch: never imports lightning, hydra or omegaconf. Callables in (``eval_fn(model) -> float``,
``input_fn(batch)``), frozen result dataclasses out; rendering (text, CSV, JSON, PNG) is separate
(:mod:`~qat_lightning.analysis.reports`).

Sub-packages: ``compare`` (bad cases, per-layer comparison, metrics), ``sensitivity`` (exact and
approximate sensitivity tables), ``search`` (mixed-precision search), ``advice`` (diagnoses with advice),
``reports`` (text/CSV/JSON/PNG rendering). ``partial`` runs chosen ops in float and bisects for the
culprit. ``inputs`` (batches -> call arguments) and ``state`` (quant-state context managers) are shared
by all of them; :class:`QuantAnalysis` (``quant_analysis``) is the facade.
"""

from qat_lightning.analysis.advice import (
    DualInt16Diagnosis,
    Fp16Diagnosis,
    LrProbeResult,
    SharedModuleAdvice,
    diagnose_dual_int16,
    diagnose_fp16,
    probe_qat_lr,
    render_dual_int16,
    render_fp16,
    render_lr_probe,
    render_shared_module_advice,
    shared_module_advice,
)
from qat_lightning.analysis.compare import (
    BUILTIN_METRICS,
    Advice,
    BadCaseResult,
    BadCaseRow,
    IndexRecorder,
    IndexReplayer,
    LayerComparison,
    LayerRow,
    Metric,
    WorstRow,
)
from qat_lightning.analysis.export_check import ExportCheck, OutputAgreement, check_export
from qat_lightning.analysis.export_layers import (
    ExportLayerComparison,
    ExportLayerRow,
    compare_export_per_layer,
    first_export_mismatch,
)
from qat_lightning.analysis.inputs import default_input_fn, flatten_outputs
from qat_lightning.analysis.ort_sessions import ORT_OPTIMIZATIONS
from qat_lightning.analysis.partial import (
    BisectResult,
    bisect_float_blocks,
    bisect_model_blocks,
    block_patterns,
    float_ops,
    match_name,
    matched_nodes,
)
from qat_lightning.analysis.quant_analysis import ANALYSIS_REFERENCES, SENSITIVITY_METHODS, QuantAnalysis
from qat_lightning.analysis.search import (
    SEARCH_METHODS,
    MixedPrecisionPlan,
    Probe,
    SearchConfig,
    SearchReporter,
    j6p_base_dtypes,
    search_fp16_topk,
    search_j6p,
    search_mixed_precision,
    write_plan,
)

__all__ = [
    "ORT_OPTIMIZATIONS",
    "BUILTIN_METRICS",
    "ANALYSIS_REFERENCES",
    "SENSITIVITY_METHODS",
    "Advice",
    "BadCaseResult",
    "BadCaseRow",
    "BisectResult",
    "DualInt16Diagnosis",
    "ExportCheck",
    "ExportLayerComparison",
    "ExportLayerRow",
    "Fp16Diagnosis",
    "IndexRecorder",
    "IndexReplayer",
    "LayerComparison",
    "LayerRow",
    "LrProbeResult",
    "Metric",
    "MixedPrecisionPlan",
    "OutputAgreement",
    "Probe",
    "QuantAnalysis",
    "SharedModuleAdvice",
    "WorstRow",
    "bisect_float_blocks",
    "bisect_model_blocks",
    "block_patterns",
    "check_export",
    "compare_export_per_layer",
    "default_input_fn",
    "diagnose_dual_int16",
    "diagnose_fp16",
    "first_export_mismatch",
    "flatten_outputs",
    "float_ops",
    "j6p_base_dtypes",
    "match_name",
    "matched_nodes",
    "probe_qat_lr",
    "render_dual_int16",
    "render_fp16",
    "render_lr_probe",
    "render_shared_module_advice",
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "SearchConfig",
    "SearchReporter",
    "SEARCH_METHODS",
    "shared_module_advice",
    "write_plan",
]
