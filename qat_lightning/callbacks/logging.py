"""Logging helpers: scalars to every logger, text / images / figures to TensorBoard, quant-node statistics.

Scalars go through ``logger.log_metrics`` (rank-zero only by Lightning's own decorators), so a CSV logger
gets them too. Text, images and figures go to the ``SummaryWriter`` of every ``TensorBoardLogger`` attached
to the trainer; without one they are a no-op. Nothing here raises on a logging failure of an optional
kind (no TensorBoard, no matplotlib): logging must never break a run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from qat_lightning.quant.dtypes import DTYPES
from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize
from qat_lightning.quant.preparation.model_check import dtype_op_shares

__all__ = [
    "tensorboard_writers",
    "log_scalars",
    "log_text",
    "log_figure",
    "log_image_file",
    "flush_loggers",
    "quant_scales",
    "dtype_ratios",
    "log_quant_scales",
    "log_dtype_ratios",
]


def tensorboard_writers(trainer: pl.Trainer) -> Iterator[Any]:
    """Yield the ``SummaryWriter`` of every TensorBoardLogger of the trainer, on global rank zero only."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment


def _step(trainer: pl.Trainer, step: int | None) -> int:
    return int(trainer.global_step if step is None else step)


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log plain float scalars to every logger of the trainer (rank zero)."""
    if not metrics or not trainer.is_global_zero:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=_step(trainer, step))


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int | None = None, code: bool = True) -> None:
    """Log ``text`` to TensorBoard's text tab (as a preformatted block when ``code``)."""
    body = "```\n" + text + "\n```" if code else text
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, body, global_step=_step(trainer, step))


def log_figure(trainer: pl.Trainer, tag: str, figure: Any, step: int | None = None) -> None:
    """Log a matplotlib figure as an image (the figure is closed afterwards)."""
    writers = list(tensorboard_writers(trainer))
    try:
        for writer in writers:
            writer.add_figure(tag, figure, global_step=_step(trainer, step), close=False)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def log_image_file(trainer: pl.Trainer, tag: str, path: Path, step: int | None = None) -> None:
    """Log a PNG file as an image."""
    writers = list(tensorboard_writers(trainer))
    if not writers:
        return
    import matplotlib.image as mpimg

    image = np.asarray(mpimg.imread(str(path)))
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    for writer in writers:
        writer.add_image(tag, image, global_step=_step(trainer, step), dataformats="HWC")


def flush_loggers(trainer: pl.Trainer) -> None:
    """Flush every TensorBoard writer (used on exceptions and after reports)."""
    for writer in tensorboard_writers(trainer):
        writer.flush()


# ----------------------------------------------------------------------------------------------- quant stats
def quant_scales(model: nn.Module) -> dict[str, float]:
    """Per integer quant node: its scale (per-channel nodes report the largest channel scale)."""
    out: dict[str, float] = {}
    for name, node in iter_fake_quantize(model):
        if node.dtype.is_integer:
            out[name] = float(torch.as_tensor(node.scale).detach().float().max())
    return out


def dtype_ratios(model: nn.Module) -> dict[str, float]:
    """Return the share of ops per compute dtype: the op shares of ``check_model``'s dtype summary.

    The counting is :func:`~qat_lightning.quant.preparation.model_check.dtype_op_shares` (one rule for
    the check report, ``PrepareQuantization`` and ``QuantStatsMonitor``): a gemm computes in the widest of
    its effective inputs and weight (a ``float32`` pass-through input node, "input left as produced",
    takes its producer's output dtype), another op in its output dtype, and an op prepare left without
    quant points in float32.

    Args:
        model: a prepared network.

    Returns:
        ``{"qint8": ..., "qint16": ..., "float16": ..., "float32": ...}`` summing to 1. A model without op
        records (quant nodes inserted by hand) falls back to the share of quant nodes per dtype; ``{}``
        when it has no quant node either.
    """
    shares = dtype_op_shares(model)
    if shares:
        return shares
    dtypes = [node.dtype.name for _, node in iter_fake_quantize(model)]
    if not dtypes:
        return {}
    return {name: dtypes.count(name) / len(dtypes) for name in DTYPES}


def log_quant_scales(trainer: pl.Trainer, model: nn.Module, prefix: str, step: int | None = None) -> None:
    """Log every integer node's scale under ``<prefix>/scale/<node>``."""
    log_scalars(trainer, {f"{prefix}/scale/{k}": v for k, v in quant_scales(model).items()}, step)


def log_dtype_ratios(trainer: pl.Trainer, model: nn.Module, step: int | None = None) -> None:
    """Log the int16 / fp16 (and int8 / fp32) ratios of the model's ops under ``quant/ratio_<dtype>``."""
    log_scalars(trainer, {f"quant/ratio_{k}": v for k, v in dtype_ratios(model).items()}, step)
