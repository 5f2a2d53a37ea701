"""qat_lightning.quant.qat in plain torch: warmup detection, input/output nodes, BatchNorm freezing."""

from __future__ import annotations

import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.qat import activation_nodes, find_lr_warmup, freeze_batchnorm, io_quant_nodes


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def test_find_lr_warmup_names_the_rising_schedules_only() -> None:
    opt = _optimizer()
    assert "LinearLR rises" in find_lr_warmup(torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=5))
    assert find_lr_warmup(torch.optim.lr_scheduler.CosineAnnealingLR(_optimizer(), T_max=10)) is None
    rising = torch.optim.lr_scheduler.LambdaLR(_optimizer(), lambda s: min(1.0, (s + 1) / 10))
    assert "factor rises from 0.1 at step 0" in find_lr_warmup(rising)


def test_io_and_activation_nodes_of_a_prepared_model() -> None:
    model = ql.prepare(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), example_inputs=(torch.randn(2, 4),)
    )
    io_names = [name for name, _ in io_quant_nodes(model)]
    acts = [name for name, _ in activation_nodes(model)]
    assert io_names and set(io_names) <= set(acts)
    assert all(node.ch_axis is None and node.dtype.is_integer for _, node in activation_nodes(model))
    assert len(io_names) < len(acts)  # inner activations are not input/output nodes


def test_freeze_batchnorm_returns_the_previous_modes() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)))
    model.train()
    model[2][0].eval()
    saved = freeze_batchnorm(model)
    assert [was for _, was in saved] == [True, False]
    assert not model[1].training and not model[2][0].training and model[0].training
