"""``QatLrProbe``: the seed's QAT learning-rate probe (QAT §1a) at the start of ``trainer.fit``.

At ``on_train_start`` (after the optimizer exists; put it after ``QuantizationAwareTraining`` in the
callback list so the model is already in QAT state) it fine-tunes ``steps`` optimizer steps at each fixed
LR of ``lrs`` (no warmup, no decay), scores each, restores the model and optimizer state between
candidates and after the probe, then sets the best LR on the optimizer (every parameter group scaled, the
ratios between groups kept) and on its schedulers' base LRs, so the real run decays from the chosen LR.

The candidates' steps train as the run's steps do (:mod:`~qat_lightning.callbacks._probe_steps`): through
the strategy's training step, backward and optimizer step, so the precision plugin (autocast, the
``16-mixed`` GradScaler, restored afterwards), ``gradient_clip_val`` / ``gradient_clip_algorithm`` and the
backward / optimizer-step hooks apply; one probe step takes ``accumulate_grad_batches`` micro-batches; every
module keeps the train/eval mode it has at the probe's start (BatchNorms frozen by
``QuantizationAwareTraining(bn_mode="freeze_bn")`` stay frozen). Manual optimization is refused.

Scoring: ``eval_fn(pl_module) -> float`` when given (``higher_is_better`` says its direction), else the
mean loss of ``training_step`` over ``eval_batches`` validation batches (lower is better) with fake quant
in VALIDATION state. ``self.log`` calls inside the probe's steps are dropped (the real run logs).

Resuming (``trainer.fit(..., ckpt_path=...)``): the probe's decision (the chosen LR and the candidates'
scores) is saved in the checkpoint; a resumed fit whose checkpoint says the probe ran does not probe again
and leaves the restored optimizer and schedulers alone, so the run decays on as if never interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from qat_lightning.analysis.advice.lr import (
    DEFAULT_LRS,
    LrProbeResult,
    LrProbeRow,
    probe_qat_lr,
    render_lr_probe,
)
from qat_lightning.callbacks._checks import (
    check_callable,
    check_count,
    check_number_list,
    check_submodule,
    require_bool,
)
from qat_lightning.callbacks._common import batch_transfer, get_submodule, request_dataloader, switch_states
from qat_lightning.callbacks._probe_steps import (
    ModuleModes,
    PrecisionState,
    loss_of,
    probe_step,
    refuse_manual_optimization,
)
from qat_lightning.callbacks.logging import log_scalars, log_text
from qat_lightning.callbacks.qat import QuantizationAwareTraining
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState

__all__ = ["QatLrProbe"]


@contextlib.contextmanager
def _no_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Drop ``self.log`` / ``self.log_dict`` calls (the probe's steps are outside Lightning's loops)."""
    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value


class QatLrProbe(Callback):
    """Pick the QAT learning rate by short fixed-LR fine-tunes before training (see the module docstring).

    Args:
        lrs: candidate LRs of the first parameter group (the seed: 1e-3, 1e-4, ...).
        steps: optimizer steps per candidate.
        eval_fn: ``eval_fn(pl_module) -> float``; ``None``: mean validation loss of ``training_step``.
        higher_is_better: direction of ``eval_fn``'s score (ignored for the default loss score).
        eval_batches: validation batches for the default score.
        submodule: attribute path of the network (for the fake-quant state during scoring).

    Attributes:
        result: the probe's :class:`~qat_lightning.analysis.advice.lr.LrProbeResult` after ``fit`` starts.

    Raises:
        ValueError: at construction for no LR, a non-positive or non-finite LR, or a count below 1.
        TypeError: at construction for ``lrs`` that is not a list of numbers, a non-int count (``1.5``,
            ``True``), a non-bool ``higher_is_better`` (``"no"``), a non-callable ``eval_fn`` or a non-str
            submodule.
    """

    def __init__(
        self,
        lrs: Sequence[float] = DEFAULT_LRS,
        steps: int = 20,
        eval_fn: Callable[[pl.LightningModule], float] | None = None,
        higher_is_better: bool = True,
        eval_batches: int = 4,
        submodule: str = "model",
    ) -> None:
        super().__init__()
        who = "QatLrProbe"
        what = "one or more positive learning rates (a list of finite numbers > 0)"
        self.lrs = check_number_list("lrs", lrs, who, what=what, low=0.0)
        self.steps = check_count("steps", steps, who)
        self.eval_fn = check_callable("eval_fn", eval_fn, who)
        higher_is_better = require_bool("higher_is_better", higher_is_better, who)
        self.higher_is_better = higher_is_better if eval_fn is not None else False
        self.eval_batches = check_count("eval_batches", eval_batches, who)
        self.submodule = check_submodule(submodule, who)
        self.result: LrProbeResult | None = None
        self._restored = False

    def _val_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        loader = request_dataloader(trainer, pl_module, "val")
        transfer = batch_transfer(trainer)
        model = get_submodule(pl_module, self.submodule)
        changed = switch_states(model, (FakeQuantState.QAT,), FakeQuantState.VALIDATION)
        modes = ModuleModes(pl_module)
        pl_module.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                for i, batch in enumerate(itertools.islice(loader, self.eval_batches)):
                    total += float(loss_of(pl_module.training_step(transfer(batch), i)))
                    count += 1
        finally:
            for node, state in changed:
                node.state = state
            modes.restore()
        return total / max(count, 1)

    def state_dict(self) -> dict[str, Any]:
        """Return what the probe decided: whether it ran, the chosen LR and every candidate's score."""
        result = self.result
        if result is None:
            return {"done": False}
        return {
            "done": True,
            "best_lr": result.best_lr,
            "best_metric": result.best_metric,
            "higher_is_better": result.higher_is_better,
            "baseline": result.baseline,
            "rows": [(row.lr, row.metric) for row in result.rows],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the decision of the interrupted run: the resumed fit does not probe again."""
        if not state_dict.get("done"):
            return
        self.result = LrProbeResult(
            rows=tuple(LrProbeRow(float(lr), float(metric)) for lr, metric in state_dict.get("rows", ())),
            best_lr=float(state_dict["best_lr"]),
            best_metric=float(state_dict.get("best_metric", float("nan"))),
            higher_is_better=bool(state_dict.get("higher_is_better", self.higher_is_better)),
            baseline=state_dict.get("baseline"),
        )
        self._restored = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the LRs, restore the states, set the chosen LR; log the table (skipped when resumed)."""
        if self._restored and self.result is not None:  # the restored optimizer/schedulers carry the LR
            self._restored = False
            best = self.result.best_lr
            rank_zero_info(f"QatLrProbe: resumed fit; lr={best:g} was chosen before, not probed again")
            return
        refuse_manual_optimization(pl_module)
        self._warn_if_before_qat(trainer)
        self._probe(trainer, pl_module)

    def _warn_if_before_qat(self, trainer: pl.Trainer) -> None:
        """Warn when a QuantizationAwareTraining comes later: the probe would train before its setup."""
        callbacks = list(trainer.callbacks)
        later = callbacks[callbacks.index(self) + 1 :] if self in callbacks else []
        if any(isinstance(c, QuantizationAwareTraining) for c in later):
            rank_zero_warn(
                "QatLrProbe is listed before QuantizationAwareTraining: its steps run before QAT state and "
                "bn_mode are set, unlike the run's. List QatLrProbe after QuantizationAwareTraining"
            )

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the LRs, restore the states, set the chosen LR; log the table."""
        optimizer = trainer.optimizers[0]
        start_opt = copy.deepcopy(optimizer.state_dict())
        modes, precision = ModuleModes(pl_module), PrecisionState(trainer)
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        base = [float(g["lr"]) for g in optimizer.param_groups]
        first = base[0] or 1.0
        loader = request_dataloader(trainer, pl_module, "train")
        transfer = batch_transfer(trainer)

        def set_lr(lr: float) -> list[float]:
            lrs = [b * lr / first if base[0] else lr for b in base]
            for group, value in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = value
            return lrs

        def train_steps(lr: float) -> pl.LightningModule:
            optimizer.load_state_dict(start_opt)
            precision.restore()
            set_lr(lr)
            modes.restore()  # the run's modes (frozen BN stays frozen), not pl_module.train()
            batches = enumerate(itertools.islice(itertools.cycle(loader), self.steps * accumulate))
            for _ in range(self.steps):
                micro = [(i, transfer(b)) for i, b in itertools.islice(batches, accumulate)]
                probe_step(trainer, pl_module, optimizer, micro)
            return pl_module

        score = self.eval_fn or (lambda m: self._val_loss(trainer, m))
        try:
            with _no_logging(pl_module):
                result = probe_qat_lr(train_steps, score, self.lrs, pl_module, self.higher_is_better)
        finally:
            modes.restore()
            precision.restore()
        best = float(trainer.strategy.broadcast(result.best_lr, src=0))
        optimizer.load_state_dict(start_opt)
        chosen = set_lr(best)
        for group, value in zip(optimizer.param_groups, chosen, strict=True):
            group["initial_lr"] = value
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = list(chosen)
                scheduler._last_lr = list(chosen)  # type: ignore[attr-defined]
        self.result = result
        name = "metric" if self.eval_fn is not None else "val loss (training_step)"
        table = render_lr_probe(result, name)
        rank_zero_info(f"QatLrProbe: lr={best:g}\n{table}")
        log_text(trainer, "qat/lr_probe", table, code=False)
        log_scalars(trainer, {"qat/lr_probe_best_lr": best})
