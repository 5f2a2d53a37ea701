"""``SanityCheck``: the seed's checks for a QAT pipeline that does not converge, as a callback.

* ``mode="lr0"`` (seed check 3): every learning rate is held at 0 during training. The QAT model's metric
  must then equal the calibration model's: weights cannot move, so a difference comes from what QAT still
  updates from the training data (activation scales, BN statistics) - i.e. from the training pipeline.
* ``mode="float"`` (seed check 2): fake quant is off during the whole run (every node FLOAT). The metric
  must equal the float model's; a difference points at the training pipeline, not the quantization tool.

The reference ("calibration model" / "float model") is ``reference=`` when given (e.g. the metric of the
float fine-tune run, the seed's exact check 2), else measured by one validation pass at train start,
before any step. The result is the monitored metric of the last validation of the fit. Pass/fail, both
numbers and the metric name are logged (``sanity/<mode>/*``) and written to ``<log_dir>/sanity_check.txt``;
a failure raises :class:`SanityCheckError` naming the seed's causes to check (or warns loudly when
``raise_on_failure=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from qat_lightning.callbacks._common import get_submodule, resolve_log_dir, write_text_rank_zero
from qat_lightning.callbacks.logging import flush_loggers, log_scalars, log_text
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState, set_fake_quantize

__all__ = ["SANITY_MODES", "SanityCheck", "SanityCheckError", "SanityResult", "CAUSES"]

SANITY_MODES = ("lr0", "float")

CAUSES = {
    "lr0": (
        "With every learning rate at 0 the weights cannot move, so the QAT model should score like the "
        "calibration model. Check, from the seed:\n"
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
        passed: whether ``|result - reference|`` is within tolerance.
        status: ``PASS``, ``FAIL``, ``NO RESULT`` or ``INCOMPLETE``.
        note: free text (how the reference was obtained, why it is incomplete).
    """

    mode: str
    monitor: str
    reference: float | None
    result: float | None
    tolerance: float
    passed: bool
    status: str
    note: str = ""

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
            f"result (QAT run, {'lr=0' if self.mode == 'lr0' else 'fake quant off'}): {_fmt(self.result)}",
            f"difference: {diff} (tolerance {self.tolerance:g})",
        ]
        if self.note:
            lines.append(f"note: {self.note}")
        if self.status != "PASS":
            lines += ["", CAUSES[self.mode]]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


class SanityCheck(Callback):
    r"""Run one of the seed's pipeline checks during ``trainer.fit`` and fail loudly when it does not hold.

    Put it after the other quantization callbacks. It validates once at train start when ``reference`` is
    not given (an extra validation pass; with ``ModelCheckpoint`` nothing is saved for step 0).

    Args:
        mode: ``"lr0"`` (learning rates held at 0; QAT metric must equal the calibration model's) or
            ``"float"`` (fake quant off; metric must equal the float model's).
        monitor: a metric the LightningModule logs in ``validation_step`` (e.g. ``"val_acc"``).
        tolerance: allowed absolute difference.
        rtol: allowed difference relative to ``|reference|`` (added to ``tolerance``).
        reference: the metric to compare with; ``None`` measures it at train start.
        raise_on_failure: raise :class:`SanityCheckError` on failure (else a loud warning).
        submodule: attribute path of the network inside the LightningModule.

    Raises:
        ValueError: at construction for an unknown mode or a negative tolerance.
    """

    def __init__(
        self,
        mode: str = "lr0",
        monitor: str = "val_loss",
        tolerance: float = 1e-3,
        rtol: float = 0.0,
        reference: float | None = None,
        raise_on_failure: bool = True,
        submodule: str = "model",
    ) -> None:
        super().__init__()
        if mode not in SANITY_MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed: {', '.join(SANITY_MODES)}")
        if not (tolerance >= 0 and rtol >= 0):
            raise ValueError(f"tolerance and rtol must be >= 0, got {tolerance} and {rtol}")
        self.mode = mode
        self.monitor = monitor
        self.tolerance = float(tolerance)
        self.rtol = float(rtol)
        self.reference = None if reference is None else float(reference)
        self.raise_on_failure = raise_on_failure
        self.submodule = submodule
        self.result: SanityResult | None = None
        self._measured = False
        self._measuring = False
        self._last: float | None = None
        self._log_dir: Path | None = None

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(mode=self.mode, monitor=self.monitor)

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the log dir on every rank."""
        self._log_dir = resolve_log_dir(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the check's condition and measure the reference if needed."""
        self._condition(trainer, pl_module)
        if self.reference is None:
            self._measure_reference(trainer)
            self._measured = True
            self._condition(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Hold the condition for every step (schedulers may rewrite the LR, callbacks the states)."""
        self._condition(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate in float too in ``float`` mode."""
        if self.mode == "float" and trainer.state.fn == TrainerFn.FITTING:
            set_fake_quantize(get_submodule(pl_module, self.submodule), FakeQuantState.FLOAT)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the monitored metric of validations that ran inside training."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self._measuring:
            return
        value = self._metric(trainer)
        if value is not None:
            self._last = value

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge, report and fail loudly."""
        if self.mode == "float":
            set_fake_quantize(get_submodule(pl_module, self.submodule), FakeQuantState.VALIDATION)
        self.result = self._judge()
        self._report(trainer, self.result)
        if self.result.status == "NO RESULT":
            rank_zero_warn("SANITY CHECK GAVE NO RESULT\n" + self.result.render())
        failed = trainer.strategy.reduce_boolean_decision(self.result.status == "FAIL", all=False)
        if failed:
            message = self.result.render()
            if self.raise_on_failure:
                raise SanityCheckError(message)
            rank_zero_warn("SANITY CHECK FAILED\n" + message)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Mark the report incomplete (unless it is this check's own failure) and flush the writers."""
        if self.mode == "float":
            set_fake_quantize(get_submodule(pl_module, self.submodule), FakeQuantState.VALIDATION)
        if not isinstance(exception, SanityCheckError):
            self.result = SanityResult(
                self.mode, self.monitor, self.reference, self._last, self.tolerance, False, "INCOMPLETE",
                f"the run stopped early: {type(exception).__name__}: {exception}",
            )  # fmt: skip
            self._report(trainer, self.result)
        flush_loggers(trainer)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the mode, the reference and the last result (a resumed run does not re-measure)."""
        return {"mode": self.mode, "monitor": self.monitor, "reference": self.reference, "last": self._last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the reference measured by the interrupted run."""
        if self.reference is None and state_dict.get("reference") is not None:
            self.reference = float(state_dict["reference"])
            self._measured = True
        self._last = state_dict.get("last")

    # ---------------------------------------------------------------------------------------------- helpers
    def _condition(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "lr0":
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = 0.0
        else:
            set_fake_quantize(get_submodule(pl_module, self.submodule), FakeQuantState.FLOAT)

    def _metric(self, trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def _measure_reference(self, trainer: pl.Trainer) -> None:
        """One validation pass before any training step (the calibration / float model)."""
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        self._measuring = True
        try:
            trainer.validating = True
            val_loop.run()
        finally:
            trainer.training = True
            self._measuring = False
        value = self._metric(trainer)
        if value is None:
            available = ", ".join(sorted(trainer.callback_metrics)) or "(none)"
            raise ValueError(
                f"SanityCheck: the LightningModule does not log {self.monitor!r} in validation; "
                f"logged metrics: {available}. Pass monitor=<one of them> (and a validation dataloader)"
            )
        self.reference = value
        rank_zero_info(f"SanityCheck({self.mode}): reference {self.monitor} = {value:.6g}")

    def _judge(self) -> SanityResult:
        origin = "given" if not self._measured else "measured at train start"
        note = f"reference {origin}"
        if self.reference is None or self._last is None or not math.isfinite(self._last):
            reason = (
                "no validation ran after the reference" if self._last is None else "the metric is not finite"
            )
            status = "NO RESULT" if self._last is None else "FAIL"
            return SanityResult(
                self.mode, self.monitor, self.reference, self._last, self.tolerance, False, status,
                f"{note}; {reason}",
            )  # fmt: skip
        allowed = self.tolerance + self.rtol * abs(self.reference)
        passed = abs(self._last - self.reference) <= allowed
        return SanityResult(
            self.mode,
            self.monitor,
            self.reference,
            self._last,
            allowed,
            passed,
            "PASS" if passed else "FAIL",
            note,
        )

    def _report(self, trainer: pl.Trainer, result: SanityResult) -> None:
        text = result.render()
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        write_text_rank_zero(trainer, log_dir / "sanity_check.txt", text)
        scalars = {f"sanity/{self.mode}/passed": float(result.passed)}
        if result.reference is not None:
            scalars[f"sanity/{self.mode}/reference"] = result.reference
        if result.result is not None and math.isfinite(result.result):
            scalars[f"sanity/{self.mode}/result"] = result.result
        log_scalars(trainer, scalars)
        log_text(trainer, f"sanity/{self.mode}", text)
        rank_zero_info(text)
