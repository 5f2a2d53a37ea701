"""What a ``SanityCheck`` reports: :class:`SanityResult`, its error, and the seed's causes to check."""

from __future__ import annotations

from dataclasses import dataclass

from qat_lightning.quant.drift import DataDrift

__all__ = ["CAUSES", "SanityCheckError", "SanityResult"]

CAUSES = {
    "lr0": (
        "With every learning rate at 0 and the activation scales and BN statistics held, the model cannot "
        "change, so it should score like the calibration model. Check, from the seed:\n"
        "  - the QAT training data pipeline against the calibration/validation one (a preprocessing or "
        "normalization mismatch moves the BN statistics and the QAT activation scales);\n"
        "  - the BN mode (QAT mode WithBN / freeze BN if the float training froze BN);\n"
        "  - that calibration ran with enough batches (10 to 100) of inference-style data;\n"
        "  - then run SanityCheck(mode='float') to rule out the training pipeline itself."
    ),
    "float": (
        "With fake quantization off the prepared model is the float model, so the run should score like the "
        "float model (or the float fine-tune). Check, from the seed:\n"
        "  - the training pipeline: remove prepare and fine-tune the float model with the same QAT pipeline; "
        "if that also fails, the pipeline (data, augmentation, LR, loss) is at fault, not quantization;\n"
        "  - that the training and validation data are preprocessed the same way as in float training;\n"
        "  - that the optimizer was built after prepare (PrepareQuantization does this in setup());\n"
        "  - the BN mode and every other setting against the float training."
    ),
}


class SanityCheckError(RuntimeError):
    """A sanity check failed: the message holds both numbers and the causes to check."""


@dataclass(frozen=True)
class SanityResult:
    """Outcome of a sanity check.

    Attributes:
        mode: ``lr0`` or ``float``.
        monitor: the metric name.
        reference: the calibration model's (lr0) or the float model's (float) metric.
        result: the metric at the end of the run (``None`` when no validation ran after the reference).
        tolerance: allowed absolute difference (plus ``rtol * |reference|``).
        passed: whether ``|result - reference|`` is within tolerance (one-sided: or better), and, for
            ``lr0``, the training data do not drift from the calibrated statistics.
        status: ``PASS``, ``FAIL``, ``NO RESULT`` or ``INCOMPLETE``.
        note: free text (how the reference was obtained, the comparison made, why it failed or is incomplete).
        drift: for ``lr0``, what the held statistics would have learnt (``None`` otherwise): its
            ``bn_shift`` is the largest channel distance, in running std, between the BatchNorm inputs'
            mean over every training sample of the run and the running mean (``bn_samples`` values per
            channel); above ``BN_SHIFT_LIMIT`` the check fails.
    """

    mode: str
    monitor: str
    reference: float | None
    result: float | None
    tolerance: float
    passed: bool
    status: str
    note: str = ""
    drift: DataDrift | None = None

    def render(self) -> str:
        """Render as the text of ``sanity_check.txt``."""
        diff = "n/a"
        if self.reference is not None and self.result is not None:
            diff = f"{self.result - self.reference:+.6g}"
        what = "calibration model" if self.mode == "lr0" else "float model"
        lines = [
            f"Sanity check ({self.mode}): {self.status}",
            f"monitor: {self.monitor}",
            f"reference ({what}): {_fmt(self.reference)}",
            f"result (QAT run, {_CONDITION[self.mode]}): {_fmt(self.result)}",
            f"difference: {diff} (tolerance {self.tolerance:g})",
        ]
        if self.drift is not None:
            lines.append(self.drift.render())
        if self.note:
            lines.append(f"note: {self.note}")
        if self.status != "PASS":
            lines += ["", CAUSES[self.mode]]
        return "\n".join(lines) + "\n"


_CONDITION = {"lr0": "lr=0, activation scales and BN statistics held", "float": "fake quant off"}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"
