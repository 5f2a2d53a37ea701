"""QAT's optimizer: the model's own ``configure_optimizers`` with the QAT learning rate, never a warmup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from qat_lightning.app.schema import QatScheduler

__all__ = ["first_optimizer", "qat_optimizers"]


def qat_optimizers(
    lit: L.LightningModule, original: Callable[[], Any], lr: float | None, scheduler: str
) -> Any:
    """Wrap ``configure_optimizers``: QAT learning rate on the model's own optimizer, no warmup.

    Every parameter group is scaled so the first group's LR is ``lr`` (ratios between groups kept, the
    seed's "replicate per-module LRs"). ``cosine`` decays to 0 over the run's steps, ``constant`` keeps the
    LR, ``keep`` returns the model's own configuration (the QAT callback refuses it if it warms up).
    """

    def configure() -> Any:
        config = original()
        if scheduler == QatScheduler.keep.value and lr is None:
            return config
        optimizer = first_optimizer(config)
        if lr is not None:
            base = optimizer.param_groups[0]["lr"] or 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * lr / base if base else lr
                group["initial_lr"] = group["lr"]
        if scheduler == QatScheduler.keep.value:
            return config
        if scheduler == QatScheduler.constant.value:
            return optimizer
        total = max(1, int(lit.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    return configure


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
