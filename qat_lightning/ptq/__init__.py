"""Post-training algorithms (plain torch), never importing lightning, hydra or omegaconf.

Equalization runs on the float model before prepare; bias correction and AdaRound after calibration.
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

__all__ = [
    "DEFAULT_ALPHAS",
    "EQUALIZE_KINDS",
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
    "rounding_error",
]
