"""``Calibration``: forward-only statistics collection, once per model, DDP-reduced.

When it runs (Lightning 2.6):

* ``trainer.fit``: in ``on_fit_start``. With the default strategies the checkpoint (``ckpt_path``) is already
  restored there, so a resumed run sees ``qat_calibrated == True`` and skips; the sanity-check validation
  and the training that follow see calibrated scales. ``trainer.fit(max_epochs=0)`` still calls
  ``on_fit_start`` (the fit loop itself is skipped), which makes it a calibration-only run; save it with
  ``trainer.save_checkpoint``. For strategies that restore after setup (``restore_checkpoint_after_setup``)
  and a ``ckpt_path``, it waits for ``on_train_start`` (or ``on_fit_end`` when no training runs).
* ``trainer.validate`` / ``test`` / ``predict`` on an uncalibrated model: at their start, so a
  calibration-only run can also be ``Trainer(callbacks=[...]).validate(model, datamodule=dm)``. Once the
  flag is set, evaluation never touches the observers, even with ``force=True`` (which applies to ``fit``
  only: one recalibration per fit).

Where the batches come from: the loaders passed to ``trainer.fit(module, train_loader, val_loader)`` (or
``validate`` / ``test``), else the datamodule's, else the module's own ``*_dataloader()`` hooks - the source
the trainer's loop itself will use - sharded per rank under DDP. Each batch is moved to the device and
converted the way Lightning's loops do (``strategy.batch_to_device``, then
``precision_plugin.convert_input``: a ``bf16-true`` model gets bf16 inputs), under the precision's
validation context (autocast for the ``*-mixed`` precisions). The work itself is the plain-torch
:func:`qat_lightning.quant.calibrate.calibrate`; an empty loader raises and leaves the model uncalibrated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from qat_lightning.callbacks._checks import (
    check_callable,
    check_count,
    check_dataloader,
    check_submodule,
    require_bool,
)
from qat_lightning.callbacks._common import (
    InputFn,
    batch_transfer,
    ensure_calibrated_flag,
    get_submodule,
    is_calibrated,
    request_dataloader,
    require_prepared,
)
from qat_lightning.callbacks.logging import log_quant_scales, log_scalars
from qat_lightning.quant.calibrate import calibrate, reduce_observer_statistics
from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize

__all__ = ["MIN_RECOMMENDED_BATCHES", "Calibration", "calibrate", "reduce_observer_statistics"]

MIN_RECOMMENDED_BATCHES = 10
"""The seed recommends at least 10 to 100 calibration steps; fewer warns."""


class Calibration(Callback):
    r"""Calibrate the prepared network once: forward-only, eval mode, no grad, state CALIBRATION.

    Afterwards every quant node is in VALIDATION state and the model's ``qat_calibrated`` buffer is set, so
    a run resumed from a checkpoint never recalibrates. Under DDP each rank reads its own shard and the
    observer statistics are all-reduced at the end: every rank ends with the global statistics and
    identical scales. The scales are logged (``calibration/scale/<node>``).

    Args:
        num_batches: number of calibration batches (``None``: the whole loader). Fewer than 10 warns (the
            seed recommends 10 to 100).
        dataloader: ``"train"`` (default; use inference-style preprocessing on training data, as the seed
            says), ``"val"``, ``"test"``, or any iterable of batches.
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).
        submodule: attribute path of the network inside the LightningModule.
        force: recalibrate at ``trainer.fit`` even when the model is already flagged as calibrated: once per
            fit (at its start, or its deferred point), statistics accumulating on top of the existing ones
            unless the observers are reset by the caller. It never applies to ``trainer.validate`` / ``test``
            / ``predict``: they calibrate only an uncalibrated model, so evaluating after a QAT fit keeps the
            trained scales.

    Raises:
        TypeError: at construction for a non-int ``num_batches`` (``1.5``, ``True``), a non-bool ``force``
            (``"no"``), a dataloader that is neither a name nor an iterable, a non-callable ``input_fn`` or a
            non-str ``submodule``.
        ValueError: at construction for a non-positive ``num_batches`` or an unknown dataloader name.
    """

    def __init__(
        self,
        num_batches: int | None = 100,
        dataloader: str | Iterable[Any] = "train",
        input_fn: InputFn | None = None,
        submodule: str = "model",
        force: bool = False,
    ) -> None:
        super().__init__()
        who = "Calibration"
        self.num_batches = check_count("num_batches", num_batches, who, allow_none=True)
        self.dataloader = check_dataloader(dataloader, who)
        self.input_fn = check_callable("input_fn", input_fn, who)
        self.submodule = check_submodule(submodule, who)
        self.force = require_bool("force", force, who)
        self.batches_used = 0
        self._pending = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (one per submodule)."""
        return self._generate_state_key(submodule=self.submodule)

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give an already prepared network its ``qat_calibrated`` flag before any checkpoint is restored."""
        model = get_submodule(pl_module, self.submodule)
        if any(True for _ in iter_fake_quantize(model)):
            ensure_calibrated_flag(model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate before the sanity check and training (checkpoint already restored)."""
        if trainer.ckpt_path and trainer.strategy.restore_checkpoint_after_setup:
            self._pending = True  # the checkpoint is restored after this hook: wait for it
            return
        self._maybe_calibrate(trainer, pl_module, force=self.force)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run a calibration deferred from ``on_fit_start``."""
        if self._pending:
            self._maybe_calibrate(trainer, pl_module, force=self.force)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run a deferred calibration when no training step ran (``max_epochs=0``)."""
        if self._pending:
            self._maybe_calibrate(trainer, pl_module, force=self.force)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate an uncalibrated model at the start of ``trainer.validate``."""
        if trainer.state.fn != TrainerFn.FITTING:
            self._maybe_calibrate(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate an uncalibrated model at the start of ``trainer.test``."""
        self._maybe_calibrate(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate an uncalibrated model at the start of ``trainer.predict``."""
        self._maybe_calibrate(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Forget a pending calibration (``calibrate`` itself restores modes and states on errors)."""
        self._pending = False

    def state_dict(self) -> dict[str, Any]:
        """Plain config only (the calibrated flag lives in the model's buffers)."""
        source = self.dataloader if isinstance(self.dataloader, str) else "custom"
        return {"num_batches": self.num_batches, "dataloader": source, "batches_used": self.batches_used}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the bookkeeping (how many batches the original calibration used)."""
        self.batches_used = int(state_dict.get("batches_used", 0))

    # ---------------------------------------------------------------------------------------------- work
    def _maybe_calibrate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, force: bool = False
    ) -> None:
        """Calibrate the network unless it is already calibrated (and ``force`` is off)."""
        self._pending = False
        model = get_submodule(pl_module, self.submodule)
        require_prepared(model, "Calibration", self.submodule)
        ensure_calibrated_flag(model)
        if is_calibrated(model) and not force:
            return
        loader = request_dataloader(trainer, pl_module, self.dataloader)
        self._warn_few_batches(loader)
        with trainer.precision_plugin.val_step_context():  # autocast for the *-mixed precisions
            used = calibrate(
                model,
                loader,
                num_batches=self.num_batches,
                input_fn=self.input_fn,
                transfer=batch_transfer(trainer),
                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            )
        if trainer.world_size > 1:
            reduce_observer_statistics(model)
        self.batches_used = used
        rank_zero_info(f"Calibration: {used} batch(es) per rank on {trainer.world_size} rank(s)")
        log_scalars(trainer, {"calibration/batches": used})
        log_quant_scales(trainer, model, prefix="calibration")

    def _warn_few_batches(self, loader: Any) -> None:
        available = _length(loader)
        planned = self.num_batches if available is None else min(available, self.num_batches or available)
        if planned is not None and 0 < planned < MIN_RECOMMENDED_BATCHES:
            rank_zero_warn(
                f"Calibration uses only {planned} batch(es); the seed recommends at least "
                f"{MIN_RECOMMENDED_BATCHES} (10 to 100) for stable scales"
            )


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
