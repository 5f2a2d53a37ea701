"""The QAT LR probe picks the LR a direct comparison shows best, and restores the model between candidates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from qat_lightning.analysis.advice.lr import probe_qat_lr, render_lr_probe
from torch import nn


def _task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    torch.manual_seed(0)
    return nn.Linear(4, 1), x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 10) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def test_probe_picks_the_lr_a_direct_comparison_shows_best():
    model, x, y = _task()
    start = copy.deepcopy(model.state_dict())
    lrs = (2.0, 1e-1, 1e-4)  # 2.0 diverges, 1e-4 barely moves: 1e-1 is best
    direct = {lr: _loss(_train(copy.deepcopy(model), x, y, lr), x, y) for lr in lrs}
    result = probe_qat_lr(
        lambda lr: _train(model, x, y, lr),
        lambda m: _loss(m, x, y),
        lrs,
        model=model,
        higher_is_better=False,
        measure_baseline=True,
    )
    assert result.best_lr == min(direct, key=direct.get) == 1e-1
    for row in result.rows:  # each candidate starts from the same state: same numbers as fresh copies
        assert row.metric == pytest.approx(direct[row.lr], rel=1e-5) or math.isnan(row.metric)
    for k, v in model.state_dict().items():  # left as it started
        assert torch.equal(v, start[k])
    assert result.baseline == pytest.approx(_loss(model, x, y))
    text = render_lr_probe(result, "mse")
    assert "| 0.1 |" in text and "yes" in text


def test_probe_direction_nan_and_errors():
    scores = {1e-3: 0.5, 1e-4: float("nan"), 1e-5: 0.7}
    result = probe_qat_lr(lambda lr: scores[lr], float)
    assert result.best_lr == 1e-5 and math.isnan(result.rows[1].metric)
    assert probe_qat_lr(lambda lr: scores[lr], float, higher_is_better=False).best_lr == 1e-3
    with pytest.raises(ValueError, match="at least one"):
        probe_qat_lr(float, float, ())
    with pytest.raises(ValueError, match="> 0"):
        probe_qat_lr(float, float, (0.0,))
