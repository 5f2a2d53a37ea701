"""AdaRound: learn, layer by layer, whether each weight rounds up or down (Nagel et al., 2020).

For each conv / linear op in graph order, the inputs it sees in the quantized model (the ops before it
already rounded) are recorded on the calibration batches. With the calibrated per-channel weight scale
``s``, each weight is ``s * clamp(floor(w / s) + h, qmin, qmax)`` with ``h = clip(sigmoid(V) * 1.2 - 0.1,
0, 1)``; ``V`` is trained with Adam to minimise the op's output error against the float weight on those
inputs, plus a regulariser that pushes every ``h`` to 0 or 1 (its exponent annealed from 20 to 2). The
learned rounding (``h = V >= 0``) is kept only when its output error on the recorded inputs is not larger
than nearest rounding's, so the result is never worse than nearest on that objective. The chosen grid
values are written into the weight (what a following QAT starts from) and the weight scale is pinned
(``fix_scale``), so the fake quant reproduces them exactly. Weights only; no labels.

The float weights it overwrites are recorded on the model (:mod:`qat_lightning.ptq.float_record`): the
prepared model with fake quant off then runs the rounded weights, but inside
:func:`qat_lightning.ptq.float_reference` (which ``QuantAnalysis`` and ``bias_correction`` use) it runs the
original float weights again. A second call starts from the recorded float weights, not from its own
rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.analysis.inputs import InputFn
from qat_lightning.ptq.capture import calibration_batches, record, run_all
from qat_lightning.ptq.gemm_view import GemmView, calibrated_views
from qat_lightning.quant import FakeQuantState
from qat_lightning.quant.checks import (
    require_count,
    require_finite,
    require_number_in,
    require_positive_finite,
)

__all__ = ["AdaRoundConfig", "AdaRoundRow", "AdaRoundResult", "adaround", "rounding_error"]

_ZETA, _GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """AdaRound's knobs.

    Attributes:
        iterations: Adam steps per op.
        reg_weight: weight of the rounding regulariser (AIMET's default 0.01).
        lr: Adam learning rate on ``V``.
        batch_size: rows (linear: tokens; conv: samples) per step.
        max_samples: rows kept per op from the calibration batches (a seeded random subset).
        warmup: share of the steps without the regulariser.
        seed: seed of the row subset and of the step batches.
    """

    iterations: int = 500
    reg_weight: float = 0.01
    lr: float = 1e-2
    batch_size: int = 256
    max_samples: int = 4096
    warmup: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        who = "AdaRoundConfig"
        for key in ("iterations", "batch_size", "max_samples"):
            require_count(key, getattr(self, key), who)
        require_count("seed", self.seed, who, minimum=0)
        require_finite("reg_weight", self.reg_weight, who)
        require_positive_finite("lr", self.lr, who)
        require_number_in("warmup", self.warmup, who, low=0.0, high=1.0, include_low=True, include_high=False)


@dataclass(frozen=True)
class AdaRoundRow:
    """One op: its output error (mean squared) with nearest and with learned rounding, and which is kept."""

    name: str
    nearest_error: float
    adaround_error: float
    kept: str
    flipped: float


@dataclass(frozen=True)
class AdaRoundResult:
    """Per-op rows, and the weighted ops left as they were with the reason."""

    rows: tuple[AdaRoundRow, ...]
    skipped: tuple[tuple[str, str], ...]


def _rows(view: GemmView, xs: list[Tensor], cfg: AdaRoundConfig) -> Tensor:
    """Return the op's quantized inputs as rows (linear: per token; conv: per sample), a seeded subset."""
    if view.kind == "linear":
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    else:
        x = torch.cat(xs)
    if x.shape[0] > cfg.max_samples:
        gen = torch.Generator().manual_seed(cfg.seed)
        x = x[torch.randperm(x.shape[0], generator=gen)[: cfg.max_samples]]
    return x


def rounding_error(view: GemmView, x: Tensor, grid: Tensor, scale: Tensor, chunk: int = 1024) -> float:
    """Mean squared difference between the op's output with weight ``scale * grid`` and with its float weight.

    This is AdaRound's objective (without the regulariser) on the rows ``x``.
    """
    w = view.weight()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i : i + chunk]
            diff = view.gemm(xb, scale * grid) - view.gemm(xb, w)
            total += float(diff.double().square().sum())
            count += diff.numel()
    return total / max(count, 1)


def _soft(v: Tensor) -> Tensor:
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def _learn(
    view: GemmView, x: Tensor, floor: Tensor, scale: Tensor, bounds: tuple[int, int], cfg: AdaRoundConfig
) -> Tensor:
    """Train ``V`` and return the hard rounding ``floor + (V >= 0)`` (clamped to the integer range)."""
    w = view.weight()
    rest = (w / scale - floor).clamp(0.01, 0.99)
    v = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    warm = int(cfg.warmup * cfg.iterations)
    for step in range(cfg.iterations):
        idx = torch.randint(0, x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=gen)
        xb = x[idx]
        with torch.no_grad():
            target = view.gemm(xb, w)
        h = _soft(v)
        diff = view.gemm(xb, scale * (floor + h).clamp(*bounds)) - target
        loss = diff.square().sum(view.channel_dim).mean()  # AIMET's reconstruction loss
        if step >= warm:
            beta = 2.0 + 18.0 * (1.0 - (step - warm) / max(cfg.iterations - warm, 1))
            loss = loss + cfg.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (floor + (v.detach() >= 0).to(floor.dtype)).clamp(*bounds)


def _round_op(view: GemmView, xs: list[Tensor], cfg: AdaRoundConfig) -> AdaRoundRow:
    x = _rows(view, xs, cfg)
    wq = view.weight_quant
    w = view.weight()
    scale = wq.scale.detach().to(w.dtype)
    scale = scale.reshape((-1,) + (1,) * (w.dim() - 1)) if scale.dim() == 1 else scale
    bounds = (wq.dtype.qmin, wq.dtype.qmax)
    nearest = torch.round(w / scale).clamp(*bounds)
    learned = _learn(view, x, torch.floor(w / scale), scale, bounds, cfg)
    err_nearest = rounding_error(view, x, nearest, scale)
    err_learned = rounding_error(view, x, learned, scale)
    keep_learned = err_learned <= err_nearest
    grid = learned if keep_learned else nearest
    view.set_weight(scale * grid)
    wq.fix_scale(True)
    flipped = float((grid != nearest).double().mean())
    return AdaRoundRow(
        view.name, err_nearest, err_learned, "adaround" if keep_learned else "nearest", flipped
    )


def adaround(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    config: AdaRoundConfig | None = None,
) -> AdaRoundResult:
    """Learn the rounding of every conv / linear weight of a calibrated model and freeze it into the weight.

    The float weights are recorded before they are overwritten (module docstring); a weight recorded by an
    earlier call is written back first, so every call rounds the original float weights.

    Args:
        model: a prepared, calibrated model (weights quantized per output channel).
        dataloader: calibration batches (no labels needed).
        num_batches: how many batches to use (``None``: all).
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).
        config: iterations, regulariser weight, learning rate, rows per op (:class:`AdaRoundConfig`).

    Returns:
        Per op: the output error with nearest and learned rounding and which one was kept.

    Raises:
        TypeError: ``model`` is not a module, ``config`` not an :class:`AdaRoundConfig`, ``num_batches`` not
            an int.
        ValueError: for an uncalibrated model, a model in CALIBRATION state, bad ``num_batches`` or no batch.
    """
    cfg = AdaRoundConfig() if config is None else config
    if not isinstance(cfg, AdaRoundConfig):
        raise TypeError(f"adaround: config must be an AdaRoundConfig or None, got {type(cfg).__name__}")
    views, skipped = calibrated_views(model, "adaround")
    batches = calibration_batches(dataloader, num_batches, input_fn, "adaround")
    for view in views:
        view.restore_weight()  # an earlier call's rounding: start again from the float weights
    rows = []
    # callers may sit in an evaluation loop (inference mode): the rounding is learned with autograd
    with torch.inference_mode(False), torch.enable_grad():
        for view in views:
            if view.weight_quant.state is FakeQuantState.FLOAT:
                skipped += ((view.name, "weight quant node in FLOAT (kept float): not rounded"),)
                continue
            with record(
                view.op, lambda args, _o, v=view: v.input_quant(args[0]).clone(), inputs_only=True
            ) as xs:
                run_all(model, batches)
            if not xs:
                skipped += ((view.name, "never ran on the calibration batches"),)
                continue
            rows.append(_round_op(view, xs, cfg))
    return AdaRoundResult(tuple(rows), skipped)
