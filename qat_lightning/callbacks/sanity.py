"""``SanityCheck``: the seed's checks for a QAT pipeline that does not converge, as a callback.

* ``mode="lr0"`` (seed check 3): every learning rate is held at 0 during training, and so is everything
  else QAT would learn from the training data: the activation scales (nodes in VALIDATION state) and the
  BatchNorm running statistics (momentum 0; BN still normalizes with the batch statistics as in training).
  The model therefore cannot change, and its metric must equal the calibration model's; a difference means
  the training pipeline changes the model some other way. What the held statistics would have learnt is
  measured instead (:class:`~qat_lightning.quant.calibrate.DataDriftMeter`): training data whose
  BatchNorm inputs, averaged per channel over every sample of the run, lie more than ``BN_SHIFT_LIMIT``
  running std from the calibrated running mean fail the check with that drift named as the cause (a
  preprocessing mismatch). The average over the whole run keeps small batches' noise (a batch mean
  wanders ~1/sqrt(batch) std) and the ordinary drift of QAT (scales moving a few percent per epoch) from
  raising a false alarm.
* ``mode="float"`` (seed check 2): fake quant is off during the whole run (every node FLOAT). The metric
  must match a float fine-tune of the same length and settings; with ``monitor_mode`` the comparison is
  one-sided (scoring better is not a failure), and the report says which comparison was made.

The reference ("calibration model" / "float model") is ``reference=`` when given (for ``float``: the metric
of a float fine-tune with the same steps and settings, the seed's exact check 2, as ``stage=troubleshoot``
passes it), else measured by one validation pass at train start, before any step (for ``float`` that is the
float model before this run, which the report states). The result is the monitored metric of the last
validation of the fit. Pass/fail, both numbers and the metric name are logged (``sanity/<mode>/*``) and
written to ``<log_dir>/sanity_check.txt``; a failure raises :class:`SanityCheckError` naming the seed's
causes to check (or warns loudly when ``raise_on_failure=False``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from qat_lightning.callbacks._checks import check_number, check_submodule, require_bool
from qat_lightning.callbacks._common import (
    get_submodule,
    resolve_log_dir,
    switch_states,
    write_text_rank_zero,
)
from qat_lightning.callbacks.logging import flush_loggers, log_scalars, log_text
from qat_lightning.callbacks.sanity_result import CAUSES, SanityCheckError, SanityResult
from qat_lightning.quant.checks import require_finite, require_str
from qat_lightning.quant.drift import DataDrift, DataDriftMeter
from qat_lightning.quant.nodes import FakeQuantize, FakeQuantState, iter_fake_quantize, set_fake_quantize
from qat_lightning.quant.qat import BN_TYPES

__all__ = ["MONITOR_MODES", "SANITY_MODES", "SanityCheck", "SanityCheckError", "SanityResult", "CAUSES"]

SANITY_MODES = ("lr0", "float")
MONITOR_MODES = (None, "min", "max")
FLOAT = FakeQuantState.FLOAT


class SanityCheck(Callback):
    r"""Run one of the seed's pipeline checks during ``trainer.fit`` and fail loudly when it does not hold.

    Put it after the other quantization callbacks. It validates once at train start when ``reference`` is
    not given (an extra validation pass; with ``ModelCheckpoint`` nothing is saved for step 0).

    Args:
        mode: ``"lr0"`` (learning rates, activation scales and BN statistics held; the metric must equal the
            calibration model's and the training data must not drift from the calibrated statistics) or
            ``"float"`` (fake quant off; the metric must match the float fine-tune's).
        monitor: a metric the LightningModule logs in ``validation_step`` (e.g. ``"val_acc"``).
        tolerance: allowed absolute difference.
        rtol: allowed difference relative to ``|reference|`` (added to ``tolerance``).
        reference: the metric to compare with; ``None`` measures it at train start.
        raise_on_failure: raise :class:`SanityCheckError` on failure (else a loud warning).
        submodule: attribute path of the network inside the LightningModule.
        monitor_mode: ``"max"`` (higher is better), ``"min"`` or ``None``. With a direction the ``float``
            check is one-sided: scoring better than the reference passes. ``None``: two-sided.

    Raises:
        ValueError: at construction for an unknown mode or monitor_mode, an empty monitor name, a negative
            or infinite tolerance / rtol, a non-finite reference.
        TypeError: at construction for a non-number tolerance / rtol / reference, a non-bool
            ``raise_on_failure`` (``"no"``), a non-str monitor or submodule.
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
        monitor_mode: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in SANITY_MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed: {', '.join(SANITY_MODES)}")
        if monitor_mode not in MONITOR_MODES:
            raise ValueError(f"monitor_mode={monitor_mode!r} is not supported; allowed: None, 'min', 'max'")
        who = "SanityCheck"
        self.mode = mode
        self.monitor = require_str("monitor", monitor, who, empty=False)
        self.tolerance = require_finite("tolerance", tolerance, who)
        self.rtol = require_finite("rtol", rtol, who)
        self.reference = check_number("reference", reference, who)
        self.raise_on_failure = require_bool("raise_on_failure", raise_on_failure, who)
        self.submodule = check_submodule(submodule, who)
        self.monitor_mode = monitor_mode
        self.result: SanityResult | None = None
        self._measured = False
        self._measuring = False
        self._last: float | None = None
        self._log_dir: Path | None = None
        self._bn_momentum: list[tuple[nn.Module, float | None]] = []
        self._meter: DataDriftMeter | None = None
        self._drift: DataDrift | None = None
        self._float_before: list[FakeQuantize] | None = None
        self._sanity_states: list[tuple[FakeQuantize, FakeQuantState]] = []

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(mode=self.mode, monitor=self.monitor)

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the log dir on every rank."""
        self._log_dir = resolve_log_dir(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the check's condition, measure the reference if needed, start measuring the drift."""
        self._condition(trainer, pl_module)
        if self.reference is None:
            self._measure_reference(trainer)
            self._measured = True
            self._condition(trainer, pl_module)
        if self.mode == "lr0":
            self._meter = DataDriftMeter(self._model(pl_module))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Hold the condition for every step (schedulers may rewrite the LR, callbacks the states)."""
        self._condition(trainer, pl_module)
        if self._meter is not None:
            self._meter.active = True
            self._meter.batches += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Measure the drift on training batches only."""
        if self._meter is not None:
            self._meter.active = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate in float too in ``float`` mode.

        Lightning's sanity-check validation runs before ``on_train_start`` has recorded which nodes the user
        keeps in FLOAT: the states are saved here and put back at its end, so the check's condition (and
        what ``on_train_end`` restores) starts from the user's states.
        """
        if self.mode == "float" and trainer.state.fn == TrainerFn.FITTING:
            model = self._model(pl_module)
            if self._float_before is None and not self._sanity_states:
                self._sanity_states = [(node, node.state) for _, node in iter_fake_quantize(model)]
            set_fake_quantize(model, FakeQuantState.FLOAT)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put back the states of a sanity-check validation; record the metric of those inside training."""
        self._restore_sanity_states()
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self._measuring:
            return
        value = self._metric(trainer)
        if value is not None:
            self._last = value

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge, report and fail loudly.

        Every rank gets here: the drift is all-reduced (so every rank judges all the shards) before judging.
        """
        self._release(pl_module, reduce=True)
        self.result = self._judge()
        failed = trainer.strategy.reduce_boolean_decision(self.result.status == "FAIL", all=False)
        if failed and self.result.status != "FAIL":  # safety net: the report states the run's verdict
            note = f"{self.result.note}; another rank judged FAIL (its numbers differ from this rank's)"
            self.result = replace(self.result, passed=False, status="FAIL", note=note)
        self._report(trainer, self.result)
        if self.result.status == "NO RESULT":
            rank_zero_warn("SANITY CHECK GAVE NO RESULT\n" + self.result.render())
        if failed:
            message = self.result.render()
            if self.raise_on_failure:
                raise SanityCheckError(message)
            rank_zero_warn("SANITY CHECK FAILED\n" + message)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Mark the report incomplete (unless it is this check's own failure) and flush the writers.

        The drift is not reduced here: other ranks may not reach this hook (no collective may wait on them).
        """
        self._release(pl_module, reduce=False)
        if not isinstance(exception, SanityCheckError):
            self.result = SanityResult(
                self.mode, self.monitor, self.reference, self._last, self.tolerance, False, "INCOMPLETE",
                f"the run stopped early: {type(exception).__name__}: {exception}", self._drift,
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
    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return get_submodule(pl_module, self.submodule)

    def _condition(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        if self.mode == "float":
            if self._float_before is None:  # nodes the user had in FLOAT stay there after the check
                self._float_before = [
                    n for _, n in iter_fake_quantize(model) if n.state is FakeQuantState.FLOAT
                ]
            set_fake_quantize(model, FakeQuantState.FLOAT)
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = 0.0
        switch_states(model, (FakeQuantState.QAT, FakeQuantState.CALIBRATION), FakeQuantState.VALIDATION)
        if not self._bn_momentum:  # hold the running statistics; BN still normalizes like in training
            self._bn_momentum = [(m, m.momentum) for m in model.modules() if isinstance(m, BN_TYPES)]
            for module, _ in self._bn_momentum:
                module.momentum = 0.0

    def _release(self, pl_module: pl.LightningModule, reduce: bool) -> None:
        """Undo the condition: quant nodes back (float mode), BN momentum restored, drift hooks removed.

        ``reduce``: all-reduce the drift across ranks (a collective: only where every rank calls it).
        """
        self._restore_sanity_states()
        if self.mode == "float" and self._float_before is not None:  # only what _condition changed
            set_fake_quantize(self._model(pl_module), FakeQuantState.VALIDATION)
            for node in self._float_before:
                node.state = FakeQuantState.FLOAT
            self._float_before = None
        for module, momentum in self._bn_momentum:
            module.momentum = momentum
        self._bn_momentum = []
        if self._meter is not None:
            self._drift = self._meter.close(reduce=reduce)
            self._meter = None

    def _restore_sanity_states(self) -> None:
        for node, state in self._sanity_states:
            node.state = state
        self._sanity_states = []

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

    def _reference_note(self) -> str:
        if not self._measured:
            return "reference given"
        if self.mode == "float":
            return (
                "reference measured at train start: the float model before this run, not a float "
                "fine-tune of the same length and settings (pass reference= that fine-tune's metric for "
                "the seed's check)"
            )
        return "reference measured at train start"

    def _comparison(self, allowed: float) -> tuple[bool, str]:
        """Whether the result is within ``allowed`` of the reference, and how that was judged."""
        assert self.reference is not None and self._last is not None
        diff = self._last - self.reference
        if self.mode == "float" and self.monitor_mode is not None:
            better = diff if self.monitor_mode == "max" else -diff
            return (
                better >= -allowed,
                f"one-sided ({self.monitor_mode}): scoring better than the reference passes",
            )
        side = "two-sided" if self.mode == "lr0" else "two-sided (pass monitor_mode to accept improvements)"
        return abs(diff) <= allowed, side

    def _judge(self) -> SanityResult:
        note = self._reference_note()
        if self.reference is None or self._last is None or not math.isfinite(self._last):
            reason = (
                "no validation ran after the reference" if self._last is None else "the metric is not finite"
            )
            status = "NO RESULT" if self._last is None else "FAIL"
            return SanityResult(
                self.mode, self.monitor, self.reference, self._last, self.tolerance, False, status,
                f"{note}; {reason}", self._drift,
            )  # fmt: skip
        allowed = self.tolerance + self.rtol * abs(self.reference)
        passed, side = self._comparison(allowed)
        notes = [note, side]
        if not passed and self.mode == "lr0":
            notes.append(
                "the model changed during training although weights, scales and BN statistics were held"
            )
        if self._drift is not None and self._drift.bn_mismatch:
            passed = False
            notes.append(
                "cause: the training batches differ from the data the model was calibrated on "
                f"(mean BatchNorm input off by {self._drift.bn_shift:.3g} running std at "
                f"{self._drift.bn_name}): QAT would learn BN statistics and scales from them"
            )
        status = "PASS" if passed else "FAIL"
        return SanityResult(
            self.mode, self.monitor, self.reference, self._last, allowed, passed, status, "; ".join(notes),
            self._drift,
        )  # fmt: skip

    def _report(self, trainer: pl.Trainer, result: SanityResult) -> None:
        text = result.render()
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        write_text_rank_zero(trainer, log_dir / "sanity_check.txt", text)
        scalars = {f"sanity/{self.mode}/passed": float(result.passed)}
        if result.reference is not None:
            scalars[f"sanity/{self.mode}/reference"] = result.reference
        if result.result is not None and math.isfinite(result.result):
            scalars[f"sanity/{self.mode}/result"] = result.result
        if result.drift is not None:
            scalars[f"sanity/{self.mode}/bn_shift"] = result.drift.bn_shift
            scalars[f"sanity/{self.mode}/range_ratio"] = result.drift.range_ratio
        log_scalars(trainer, scalars)
        log_text(trainer, f"sanity/{self.mode}", text)
        rank_zero_info(text)
