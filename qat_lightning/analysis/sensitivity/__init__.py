"""Quantization sensitivity (the seed's "Calculating Quantization Sensitivity"): one table per metric.

* ``exact``: one op's quant node(s) on at a time, the rest of the model in float; ``downstream`` re-runs
  only the fx graph below every call that uses those nodes (a module called twice shares its weight node:
  both calls) from cached float activations;
* ``approximate``: a first-order Taylor estimate from one forward and a few backward passes.
"""

from qat_lightning.analysis.sensitivity.approximate import approximate_sensitivity, estimate_to_metric
from qat_lightning.analysis.sensitivity.exact import (
    SensitivityTarget,
    build_tables,
    check_types,
    exact_sensitivity,
    sensitivity_targets,
)

__all__ = [
    "SensitivityTarget",
    "approximate_sensitivity",
    "build_tables",
    "check_types",
    "estimate_to_metric",
    "exact_sensitivity",
    "sensitivity_targets",
]
