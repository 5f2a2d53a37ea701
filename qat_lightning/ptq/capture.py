"""Batches for the post-training algorithms, and hooks that record what one module sees or returns."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.analysis.inputs import InputFn, ModelInputs, call_model, iter_batches
from qat_lightning.quant.checks import require_count

__all__ = ["calibration_batches", "channel_sum", "eval_mode", "record", "run_all"]


def calibration_batches(
    dataloader: Iterable[Any], num_batches: int | None, input_fn: InputFn | None, who: str
) -> list[ModelInputs]:
    """Return the first ``num_batches`` batches as model inputs (kept: the algorithms re-read them).

    Raises:
        TypeError: for a ``num_batches`` that is not an int (``1.5``, ``"2"``, ``True``).
        ValueError: for a non-positive ``num_batches`` or an empty ``dataloader``.
    """
    require_count("num_batches", num_batches, who, allow_none=True)
    batches = list(iter_batches(dataloader, num_batches, input_fn))
    if not batches:
        raise ValueError(f"{who}: the dataloader gave no batch; it needs calibration batches")
    return batches


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (BN running statistics, no dropout); restore every module's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def run_all(model: nn.Module, batches: list[ModelInputs]) -> list[Any]:
    """Run ``model`` in eval mode on every batch (no grad) and return the outputs; train flags restored."""
    with eval_mode(model):
        return [call_model(model, b) for b in batches]


@contextmanager
def record(
    module: nn.Module, fn: Callable[[tuple[Any, ...], Any], Any], *, inputs_only: bool = False
) -> Iterator[list[Any]]:
    """Record with a hook on ``module``: each call appends ``fn(args, output)``.

    ``output`` is ``None`` with ``inputs_only``.

    With ``inputs_only`` the hook is a forward pre-hook, so the recorded inputs are those of the call
    before the module changes anything.
    """
    seen: list[Any] = []
    if inputs_only:
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(fn(args, None)))
    else:
        handle = module.register_forward_hook(lambda _m, args, out: seen.append(fn(args, out)))
    try:
        yield seen
    finally:
        handle.remove()


def channel_sum(t: Tensor, dim: int) -> tuple[Tensor, int]:
    """Sum of ``t`` over every dim but ``dim`` (in float64), and how many values each channel summed."""
    moved = t.detach().movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1]).double()
    return flat.sum(0), flat.shape[0]
