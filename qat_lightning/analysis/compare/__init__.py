"""Float vs quantized, side by side: bad cases, per-layer comparison, and the error metrics they use.

* ``bad_case``: the worst sample per model output per metric (the seed's ``auto_find_bad_case``);
* ``layer_record`` + ``lockstep`` + ``alignment`` + ``stats``: both models run op-aligned, per-op summaries
  are streamed (the seed's ``qa.run()``); ``layer_compare`` turns them into the per-layer table and advice;
* ``metrics``: error metrics between a float and a quantized tensor; ``index_ops``: the quantized model
  replays the float model's indices (sort/topk/argmax) so the two stay comparable.
"""

from qat_lightning.analysis.compare.alignment import Alignment, align_ops
from qat_lightning.analysis.compare.bad_case import BadCaseResult, BadCaseRow, WorstRow, find_bad_cases
from qat_lightning.analysis.compare.index_ops import INDEX_OPS, IndexRecorder, IndexReplayer
from qat_lightning.analysis.compare.layer_compare import (
    Advice,
    LayerComparison,
    LayerRow,
    advise,
    compare_layers,
)
from qat_lightning.analysis.compare.layer_record import OpRecord, record_layers
from qat_lightning.analysis.compare.metrics import (
    BUILTIN_METRICS,
    Metric,
    MetricLike,
    resolve_metric,
    resolve_metrics,
)

__all__ = [
    "BUILTIN_METRICS",
    "INDEX_OPS",
    "Advice",
    "Alignment",
    "BadCaseResult",
    "BadCaseRow",
    "IndexRecorder",
    "IndexReplayer",
    "LayerComparison",
    "LayerRow",
    "Metric",
    "MetricLike",
    "OpRecord",
    "WorstRow",
    "advise",
    "align_ops",
    "compare_layers",
    "find_bad_cases",
    "record_layers",
    "resolve_metric",
    "resolve_metrics",
]
