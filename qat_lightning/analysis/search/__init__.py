"""Mixed-precision search (the seed's int8/int16, int16/fp16 and J6P tuning procedures).

* ``mixed_precision``: :func:`search_mixed_precision`, the int8/int16 binary search on a sensitivity table;
* ``precision_paths``: the int16 -> fp16 top-k step and the J6P procedure, on top of it;
* ``precision_nodes``: which quant nodes a sensitivity row stands for, and what an assignment costs;
* ``probes``: running and recording the search's probes (``ProbeRunner``), the fast boundary guess;
* ``probe_cache``: :class:`ActivationReuse`, probes rerunning only the graph downstream of the changed ops
  from kept activations (``SearchConfig.reuse_activations``);
* ``result``: the frozen results (:class:`MixedPrecisionPlan`, :class:`Probe`, :class:`SearchConfig`);
* ``report``: :class:`SearchReporter`, which writes the search's files (the search itself writes none).
"""

from qat_lightning.analysis.search.mixed_precision import (
    SEARCH_METHODS,
    MixedPrecisionPlan,
    Probe,
    SearchConfig,
    SearchReporter,
    search_mixed_precision,
    write_plan,
)
from qat_lightning.analysis.search.precision_paths import j6p_base_dtypes, search_fp16_topk, search_j6p

__all__ = [
    "SEARCH_METHODS",
    "MixedPrecisionPlan",
    "SearchConfig",
    "SearchReporter",
    "Probe",
    "j6p_base_dtypes",
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "write_plan",
]
