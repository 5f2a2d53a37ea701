"""Post-training algorithms (plain torch), never importing lightning, hydra or omegaconf.

Equalization runs on the float model before prepare; bias correction and AdaRound after calibration. Those
two overwrite float parameters of the prepared model (rounded weights, corrected biases) and record the
values they overwrote (:mod:`~qat_lightning.ptq.float_record`); :func:`float_reference` gives the float
model back to anything that uses "fake quant off" as its reference.
"""

from qat_lightning.ptq.adaround import AdaRoundConfig, AdaRoundResult, AdaRoundRow, adaround, rounding_error
from qat_lightning.ptq.bias_correction import BiasCorrectionResult, BiasCorrectionRow, bias_correction
from qat_lightning.ptq.equalize import (
    DEFAULT_ALPHAS,
    EQUALIZE_KINDS,
    EqualizationResult,
    EqualizedGroup,
    equalize,
)
from qat_lightning.ptq.float_record import (
    PTQ_CHECKPOINT_KEY,
    float_record_state,
    load_float_record_state,
    original_float_parameters,
)
from qat_lightning.ptq.float_reference import float_reference

__all__ = [
    "DEFAULT_ALPHAS",
    "EQUALIZE_KINDS",
    "PTQ_CHECKPOINT_KEY",
    "AdaRoundConfig",
    "AdaRoundResult",
    "AdaRoundRow",
    "BiasCorrectionResult",
    "BiasCorrectionRow",
    "EqualizationResult",
    "EqualizedGroup",
    "adaround",
    "bias_correction",
    "equalize",
    "float_record_state",
    "float_reference",
    "load_float_record_state",
    "original_float_parameters",
    "rounding_error",
]
