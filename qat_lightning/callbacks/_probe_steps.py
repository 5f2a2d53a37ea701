"""``QatLrProbe``'s candidate steps, trained the way the fit loop's automatic optimization trains.

Each probe step goes through Lightning's own pieces, as a step of the run does:

* ``trainer.strategy.training_step`` (the precision's train-step context, autocast for ``*-mixed``; the DDP
  wrapper when there is one), the loss divided by ``trainer.accumulate_grad_batches``;
* ``trainer.strategy.backward`` (the precision plugin scales the loss, e.g. the ``16-mixed`` GradScaler;
  the ``on_before_backward`` / ``on_after_backward`` hooks run);
* ``trainer.strategy.optimizer_step`` (the plugin unscales, calls ``on_before_optimizer_step`` and clips with
  ``trainer.gradient_clip_val`` / ``gradient_clip_algorithm`` through ``configure_gradient_clipping``,
  then steps; a GradScaler skips a step with non-finite gradients and updates its scale).

Gradient accumulation: one probe step is ``accumulate_grad_batches`` micro-batches, the gradient sync of all
but the last blocked (as the loop does), then one optimizer step. The precision plugin's state (the
GradScaler's scale and growth tracker) is saved before the probe and restored before each candidate and
after the probe, so every candidate and the run start from the scaler the run would have had.

Module modes: the probe trains each module in the mode it has when the probe starts (after
``QuantizationAwareTraining.on_train_start``: BatchNorms frozen by ``bn_mode="freeze_bn"`` stay in eval
mode, a frozen teacher stays frozen), never ``pl_module.train()``, which would undo them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn
from torch.optim import Optimizer

__all__ = ["ModuleModes", "PrecisionState", "loss_of", "probe_step", "refuse_manual_optimization"]


def loss_of(output: Any) -> torch.Tensor:
    """Return the loss of a ``training_step`` output (a tensor or a dict with ``"loss"``).

    Raises:
        ValueError: for any other output (the probe needs the loss to train and score).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise ValueError(
        "QatLrProbe needs training_step to return the loss (a tensor or a dict with 'loss'); "
        f"got {type(output).__name__}"
    )


def refuse_manual_optimization(pl_module: pl.LightningModule) -> None:
    """Refuse a module with manual optimization: its steps are its own, the probe cannot set their LR.

    Raises:
        ValueError: when ``pl_module.automatic_optimization`` is off.
    """
    if not pl_module.automatic_optimization:
        raise ValueError(
            "QatLrProbe needs automatic optimization (the probe's steps run Lightning's training step, "
            "backward and optimizer step as the fit loop does); this LightningModule sets "
            "automatic_optimization = False. Probe the LR in your own loop, or remove QatLrProbe"
        )


class ModuleModes:
    """The train/eval flag of every submodule at one moment, to put back after ``eval()`` or a step."""

    def __init__(self, module: nn.Module) -> None:
        """Record the flags of ``module`` and all its submodules."""
        self._modes = [(m, m.training) for m in module.modules()]

    def restore(self) -> None:
        """Put every recorded module back in its recorded mode."""
        for module, training in self._modes:
            module.training = training


class PrecisionState:
    """The precision plugin's state (the GradScaler's), saved once, restored on demand."""

    def __init__(self, trainer: pl.Trainer) -> None:
        """Save ``trainer.precision_plugin``'s state (empty for plugins without one)."""
        self._plugin = trainer.precision_plugin
        self._state = copy.deepcopy(self._plugin.state_dict())

    def restore(self) -> None:
        """Load the saved state back into the plugin (nothing to do for a stateless plugin)."""
        if self._state:
            self._plugin.load_state_dict(copy.deepcopy(self._state))


@contextlib.contextmanager
def _no_backward_sync(strategy: Any) -> Iterator[None]:
    """Block the gradient all-reduce of a micro-batch that does not step (as the fit loop does)."""
    if isinstance(strategy, ParallelStrategy):
        with strategy.block_backward_sync():
            yield
    else:
        yield


def _closure(trainer: pl.Trainer, optimizer: Optimizer, batch: Any, batch_idx: int, count: int) -> Any:
    """Return the closure of one micro-batch: training step, loss / ``count``, backward."""

    def run() -> torch.Tensor:
        loss = loss_of(trainer.strategy.training_step(batch, batch_idx))
        if count > 1:
            loss = loss / count
        trainer.strategy.backward(loss, optimizer)
        return loss.detach()

    return run


def probe_step(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: Optimizer,
    micro_batches: Sequence[tuple[int, Any]],
) -> None:
    """Run one optimizer step over ``micro_batches`` (``(batch_idx, batch)``, already on the device).

    Args:
        trainer: the running trainer (its strategy, precision plugin and clipping settings are used).
        pl_module: the LightningModule being fitted.
        optimizer: the optimizer to step (the trainer's first).
        micro_batches: ``trainer.accumulate_grad_batches`` batches; the loss of each is divided by their
            number, as the fit loop divides it by ``accumulate_grad_batches``.
    """
    optimizer.zero_grad()
    closures = [_closure(trainer, optimizer, b, i, len(micro_batches)) for i, b in micro_batches]
    for closure in closures[:-1]:
        with _no_backward_sync(trainer.strategy):
            closure()
    trainer.strategy.optimizer_step(optimizer, closures[-1], model=pl_module)
