"""The seed's QAT learning-rate probe (QAT §1a), on plain callables.

"Disable warmup and learning rate decay strategies. Use different fixed learning rates (e.g., 1e-3, 1e-4,
etc.) to fine-tune for a few steps and select the learning rate with best accuracy." :func:`probe_qat_lr`
does exactly that: for each candidate it restores the model's starting state, calls
``train_steps_fn(lr)`` (a few steps at that fixed LR), scores the result with ``eval_fn`` and keeps the
best. The model is left in its starting state: the real QAT run then trains with the chosen LR and the
float run's decay shape (no warmup).

Plain torch: no lightning, no hydra.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["DEFAULT_LRS", "LrProbeResult", "LrProbeRow", "probe_qat_lr", "render_lr_probe"]

DEFAULT_LRS: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
"""The seed's example candidates."""


@dataclass(frozen=True)
class LrProbeRow:
    """One candidate of the probe.

    Attributes:
        lr: the fixed learning rate tried.
        metric: the metric after the short fine-tune (``nan`` when training diverged to a non-finite score).
    """

    lr: float
    metric: float


@dataclass(frozen=True)
class LrProbeResult:
    """What the probe measured and chose.

    Attributes:
        rows: one per candidate, in the order tried.
        best_lr: the candidate with the best metric (ties: the first tried).
        best_metric: its metric.
        higher_is_better: the metric's direction.
        baseline: the metric before any training (``None`` when not measured).
    """

    rows: tuple[LrProbeRow, ...]
    best_lr: float
    best_metric: float
    higher_is_better: bool = True
    baseline: float | None = None


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if higher_is_better else a < b


def probe_qat_lr(
    train_steps_fn: Callable[[float], Any],
    eval_fn: Callable[[Any], float],
    lrs: Sequence[float] = DEFAULT_LRS,
    model: nn.Module | None = None,
    higher_is_better: bool = True,
    measure_baseline: bool = False,
) -> LrProbeResult:
    """Fine-tune a few steps at each fixed LR, evaluate, and return the table and the best LR.

    Args:
        train_steps_fn: ``train_steps_fn(lr)`` trains a few steps at the fixed ``lr`` (no warmup, no decay)
            and returns what ``eval_fn`` scores (the model, or anything else, e.g. a metric it measured).
        eval_fn: ``eval_fn(trained) -> float`` scores what ``train_steps_fn`` returned.
        lrs: the candidates, tried in order.
        model: when given, its state (parameters and buffers, so fake-quant scales too) is restored before
            each candidate and after the probe; leave ``None`` when ``train_steps_fn`` starts from a fresh
            copy itself (e.g. from a checkpoint).
        higher_is_better: the metric's direction.
        measure_baseline: also score ``model`` before any training (needs ``model``).

    Returns:
        The table and the chosen LR.

    Raises:
        ValueError: for no candidates, a non-positive LR or ``measure_baseline`` without a model.
    """
    lrs = tuple(float(lr) for lr in lrs)
    if not lrs:
        raise ValueError("probe_qat_lr needs at least one learning rate")
    bad = [lr for lr in lrs if not lr > 0]
    if bad:
        raise ValueError(f"learning rates must be > 0 (lr=0 is the sanity check, not a candidate): {bad}")
    if measure_baseline and model is None:
        raise ValueError("measure_baseline=True needs the model")
    start = copy.deepcopy(model.state_dict()) if model is not None else None
    baseline = float(eval_fn(model)) if measure_baseline else None
    rows: list[LrProbeRow] = []
    try:
        for lr in lrs:
            if model is not None and start is not None:
                model.load_state_dict(start)
            score = float(eval_fn(train_steps_fn(lr)))
            rows.append(LrProbeRow(lr, score if math.isfinite(score) else math.nan))
    finally:
        if model is not None and start is not None:
            model.load_state_dict(start)
    best = rows[0]
    for row in rows[1:]:
        if _better(row.metric, best.metric, higher_is_better):
            best = row
    return LrProbeResult(tuple(rows), best.lr, best.metric, higher_is_better, baseline)


def render_lr_probe(result: LrProbeResult, metric_name: str = "metric") -> str:
    """Render the probe as a Markdown table (the chosen LR marked)."""
    lines = [f"| lr | {metric_name} | chosen |", "|---|---|---|"]
    for row in result.rows:
        mark = "yes" if row.lr == result.best_lr else ""
        lines.append(f"| {row.lr:g} | {row.metric:.4f} | {mark} |")
    if result.baseline is not None:
        lines.append(f"| (before training) | {result.baseline:.4f} | |")
    return "\n".join(lines)
