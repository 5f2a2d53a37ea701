"""QAT's optimizer: the model's own ``configure_optimizers`` with the QAT learning rate, never a warmup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from qat_lightning.app.schema import QatScheduler

__all__ = ["first_optimizer", "qat_optimizers", "rescale_schedulers"]


def qat_optimizers(
    lit: L.LightningModule, original: Callable[[], Any], lr: float | None, scheduler: str
) -> Any:
    """Wrap ``configure_optimizers``: QAT learning rate on the model's own optimizer, no warmup.

    Every parameter group is scaled by ``lr / float LR`` (ratios between groups kept, the seed's "replicate
    per-module LRs"); the float LR is the first group's base LR (``initial_lr``, where a scheduler's schedule
    starts from: the optimizer's LR, ``OneCycleLR``'s ``max_lr / div_factor``, ``CyclicLR``'s ``base_lr``).
    ``cosine`` decays to 0 over the run's steps, ``constant`` keeps the LR, ``keep`` returns the model's own
    configuration (the QAT callback refuses it if it warms up): with ``lr`` its schedulers are rescaled by
    the same factor (:func:`rescale_schedulers`), so every step's LR is the model's schedule times it.
    """

    def configure() -> Any:
        config = original()
        if scheduler == QatScheduler.keep.value and lr is None:
            return config
        optimizer = first_optimizer(config)
        keep = scheduler == QatScheduler.keep.value
        if lr is not None:
            first = optimizer.param_groups[0]
            base = first.get("initial_lr", first["lr"])  # the configured LR (a scheduler may have moved lr)
            factor = lr / base if base else None
            if keep:
                rescale_schedulers(config, optimizer, factor)
            if not keep or factor is None:
                for group in optimizer.param_groups:
                    group["lr"] = group.get("initial_lr", group["lr"]) * factor if factor else lr
                    group["initial_lr"] = group["lr"]
        if keep:
            return config
        if scheduler == QatScheduler.constant.value:
            return optimizer
        total = max(1, int(lit.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    return configure


_GROUP_LRS = ("lr", "initial_lr", "max_lr", "min_lr")
"""LR values a parameter group may hold (``OneCycleLR``: ``max_lr`` / ``min_lr``)."""
_SCHEDULER_LRS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "eta_min")
"""LR values a torch scheduler may hold (``CyclicLR``: ``max_lrs``; ``ReduceLROnPlateau``: ``min_lrs``;
``CosineAnnealingLR``: ``eta_min``)."""
_SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _schedulers(config: Any) -> list[Any]:
    """Every scheduler object of a ``configure_optimizers`` result (``lr_scheduler`` entries, lists)."""
    if isinstance(config, dict):
        found = config.get("lr_scheduler", config.get("scheduler"))
        return [] if found is None else _schedulers(found)
    if isinstance(config, (list, tuple)):
        return [s for item in config for s in _schedulers(item)]
    if isinstance(config, torch.optim.Optimizer):
        return []
    return [config]


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, factor) for v in value)
    scalable = isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
    return value * factor if scalable else value


def rescale_schedulers(config: Any, optimizer: torch.optim.Optimizer, factor: float | None) -> None:
    """Scale the model's schedule of ``optimizer`` by ``factor`` (``qat.scheduler=keep`` with ``qat.lr``).

    Every LR the schedule computes from is scaled: the groups' ``lr`` / ``initial_lr`` (and ``OneCycleLR``'s
    ``max_lr`` / ``min_lr``), each scheduler's ``base_lrs`` and other LR attributes (:data:`_SCHEDULER_LRS`),
    the schedulers chained inside ``SequentialLR`` / ``ChainedScheduler`` too. The groups are scaled here.

    Args:
        config: the ``configure_optimizers`` result (its schedulers of ``optimizer`` are rescaled).
        optimizer: the optimizer whose groups and schedulers are scaled.
        factor: ``qat.lr / float LR``; ``None`` (a first LR of 0) scales nothing.

    Raises:
        ValueError: for a scheduler of an unknown kind (its LR values cannot be found), or a first LR of 0
            with a scheduler (no factor).
    """
    schedulers = [s for s in _schedulers(config) if getattr(s, "optimizer", optimizer) is optimizer]
    unknown = [type(s).__name__ for s in schedulers if not isinstance(s, _SCHEDULER_TYPES)]
    if unknown or (schedulers and factor is None):
        why = f"a scheduler of unknown kind ({', '.join(unknown)})" if unknown else "a first LR of 0"
        raise ValueError(
            f"qat.scheduler=keep with qat.lr cannot rescale the model's schedule: {why}; set qat.lr=null "
            "(the model's own LRs) or qat.scheduler=cosine|constant"
        )
    if factor is None:
        return
    todo = list(schedulers)
    while todo:
        sched = todo.pop()
        todo.extend(getattr(sched, "_schedulers", ()))
        for name in _SCHEDULER_LRS:
            if hasattr(sched, name):
                setattr(sched, name, _scaled(getattr(sched, name), factor))  # type: ignore[arg-type]
    for group in optimizer.param_groups:
        for key in _GROUP_LRS:
            if key in group:
                group[key] = _scaled(group[key], factor)


def first_optimizer(config: Any) -> torch.optim.Optimizer:
    """Return the first optimizer of a ``configure_optimizers`` result (optimizer, dict, list or tuple)."""
    if isinstance(config, torch.optim.Optimizer):
        return config
    if isinstance(config, dict):
        return first_optimizer(config["optimizer"])
    if isinstance(config, (list, tuple)) and config:
        return first_optimizer(config[0])
    raise ValueError(
        f"cannot find the optimizer in configure_optimizers()' result {type(config).__name__}; "
        "use qat.scheduler=keep qat.lr=null to train QAT with the model's own configuration"
    )
