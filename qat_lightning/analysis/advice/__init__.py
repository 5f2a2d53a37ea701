"""Diagnoses that end in advice (the seed's troubleshooting sections), each with a text renderer.

* ``int16``: why an all-int16 model fails (dual-int16 scenarios);
* ``fp16``: which non-gemm ops overflow or lose precision in fp16 (j6p);
* ``shared``: shared modules whose call sites need separate quant points;
* ``lr``: the QAT learning-rate probe.
"""

from qat_lightning.analysis.advice.fp16 import Fp16Diagnosis, diagnose_fp16, render_fp16
from qat_lightning.analysis.advice.int16 import DualInt16Diagnosis, diagnose_dual_int16, render_dual_int16
from qat_lightning.analysis.advice.lr import LrProbeResult, probe_qat_lr, render_lr_probe
from qat_lightning.analysis.advice.shared import (
    SharedModuleAdvice,
    render_shared_module_advice,
    shared_module_advice,
)

__all__ = [
    "DualInt16Diagnosis",
    "Fp16Diagnosis",
    "LrProbeResult",
    "SharedModuleAdvice",
    "diagnose_dual_int16",
    "diagnose_fp16",
    "probe_qat_lr",
    "render_dual_int16",
    "render_fp16",
    "render_lr_probe",
    "render_shared_module_advice",
    "shared_module_advice",
]
