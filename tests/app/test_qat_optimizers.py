"""qat_lightning.app.qat_optimizers: ``qat.scheduler=keep`` with ``qat.lr`` rescales the model's schedule."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as sched

from qat_lightning.app.qat_optimizers import qat_optimizers

FLOAT_LR, QAT_LR, STEPS = 3e-3, 1e-4, 12

SCHEDULES = {
    "lambda": lambda opt: sched.LambdaLR(opt, lambda step: 1.0 - step / 20),
    "cosine": lambda opt: sched.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4),
    "step": lambda opt: sched.StepLR(opt, step_size=3, gamma=0.5),
    "onecycle": lambda opt: sched.OneCycleLR(opt, max_lr=FLOAT_LR, total_steps=STEPS + 1),
    "cyclic": lambda opt: sched.CyclicLR(opt, base_lr=FLOAT_LR / 10, max_lr=FLOAT_LR, step_size_up=4),
    "sequential": lambda opt: sched.SequentialLR(
        opt, [sched.ConstantLR(opt, 0.5, total_iters=3), sched.ExponentialLR(opt, 0.9)], milestones=[3]
    ),
}


def _configure(kind: str):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    groups = [{"params": net[0].parameters()}, {"params": net[1].parameters(), "lr": FLOAT_LR * 2}]

    def original():
        opt = torch.optim.SGD(groups, lr=FLOAT_LR, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": SCHEDULES[kind](opt), "interval": "step"}}

    return original


def _lrs_used(config) -> list[float]:
    """The LR of every group at every optimizer step (flat: step 0 groups, step 1 groups, ...)."""
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    used = []
    for _ in range(STEPS):
        used += [float(g["lr"]) for g in opt.param_groups]
        opt.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_keep_with_qat_lr_is_the_float_schedule_scaled(kind: str) -> None:
    config = _configure(kind)()
    base = config["optimizer"].param_groups[0]["initial_lr"]  # where the schedule starts from
    assert base == FLOAT_LR or kind in ("onecycle", "cyclic")  # those start from their own base LR
    float_lrs = _lrs_used(config)
    qat_lrs = _lrs_used(qat_optimizers(None, _configure(kind), QAT_LR, "keep")())
    assert qat_lrs == pytest.approx([lr * QAT_LR / base for lr in float_lrs], rel=1e-6)
    assert len(set(qat_lrs[::2])) > 1  # the schedule moves


def test_keep_without_qat_lr_is_the_model_configuration() -> None:
    assert _lrs_used(qat_optimizers(None, _configure("lambda"), None, "keep")()) == pytest.approx(
        _lrs_used(_configure("lambda")())
    )


def test_keep_with_an_unknown_scheduler_kind_is_refused() -> None:
    class Custom:
        def step(self) -> None:
            pass

    def original():
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=FLOAT_LR)
        return {"optimizer": opt, "lr_scheduler": Custom()}

    with pytest.raises(ValueError, match=r"cannot rescale the model's schedule: .*Custom.*qat.lr=null"):
        qat_optimizers(None, original, QAT_LR, "keep")()


@pytest.mark.parametrize("scheduler", ["constant", "keep"])
def test_first_group_gets_qat_lr_and_ratios_are_kept(scheduler: str) -> None:
    def original():
        net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        groups = [{"params": net[0].parameters()}, {"params": net[1].parameters(), "lr": FLOAT_LR * 2}]
        return torch.optim.SGD(groups, lr=FLOAT_LR)

    config = qat_optimizers(None, original, QAT_LR, scheduler)()
    assert [g["lr"] for g in config.param_groups] == pytest.approx([QAT_LR, 2 * QAT_LR])
