"""The seed's QAT learning-rate probe inside the app (``qat.lr_probe.lrs=[1e-3,1e-4,1e-5]``).

Each candidate is a short QAT run from the calibration checkpoint at a fixed LR (``constant``: no warmup,
no decay), exactly ``qat.lr_probe.steps`` optimizer steps over as many epochs as that takes (each epoch
``train.limit_train_batches`` batches when set), scored on the validation data; the best LR then trains
the real QAT run with ``qat.scheduler`` (the float run's decay shape, no warmup). The table goes into the
step's ``lr_probe.md``, the summary (one row per candidate and a decision) and TensorBoard, each with the
optimizer steps the candidate's trainer really ran (``trainer.global_step``; fewer than asked warns).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from qat_lightning.analysis.advice.lr import LrProbeResult, probe_qat_lr, render_lr_probe
from qat_lightning.files import write_atomic

__all__ = ["run_lr_probe"]

log = logging.getLogger("qat_lightning")


class _StepCount(Callback):
    """Record the optimizer steps a probe run's trainer really ran (``trainer.global_step`` at its end)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Keep ``trainer.global_step``."""
        self.steps = int(getattr(trainer, "global_step", 0))


def _steps_text(steps: dict[float, int]) -> str:
    """``14 steps each`` when every candidate ran the same, else ``0.001: 14, 0.01: 9 steps``."""
    if len(set(steps.values())) == 1:
        return f"{next(iter(steps.values()))} steps each"
    return ", ".join(f"{lr:g}: {n}" for lr, n in steps.items()) + " steps"


def _log_tensorboard(
    pipe: Any, out: Path, result: LrProbeResult, table: str, steps: dict[float, int]
) -> None:
    logger = pipe.session.factories.logger(out)
    writer = getattr(logger, "experiment", None) if logger is not None else None
    if writer is None or not hasattr(writer, "add_scalar"):
        return
    for i, row in enumerate(result.rows):
        writer.add_scalar(f"lr_probe/{pipe.session.monitor}", row.metric, i)
        writer.add_scalar("lr_probe/lr", row.lr, i)
        writer.add_scalar("lr_probe/steps", steps[row.lr], i)
    writer.add_text("lr_probe/table", table, 0)
    writer.flush()


def run_lr_probe(pipe: Any, calib_ckpt: Path, recipe: Any) -> float | None:
    """Probe ``qat.lr_probe`` from ``calib_ckpt``; return the chosen LR (``None`` when the probe is off).

    Args:
        pipe: the :class:`~qat_lightning.app.pipeline.Pipeline`.
        calib_ckpt: the calibration checkpoint QAT starts from.
        recipe: its recipe (for the summary rows).
    """
    from qat_lightning.app.checkpoints import is_rank_zero

    q = pipe.cfg.qat
    if not q.lr_probe.lrs:
        return None
    s = pipe.session
    out = pipe.step("lr_probe", f"QAT LR probe ({', '.join(f'{lr:g}' for lr in q.lr_probe.lrs)})")
    asked, steps = q.lr_probe.steps, {}

    def train(lr: float) -> float:
        count = _StepCount()
        _, metric, _, _ = s.qat(
            calib_ckpt,
            out / f"lr_{lr:g}",
            name="",
            extra=[count],
            lr=lr,
            scheduler="constant",
            max_epochs=-1,  # as many epochs as the steps take (an epoch: train.limit_train_batches batches)
            max_steps=asked,
        )
        steps[lr] = count.steps
        if count.steps < asked:
            log.warning("QAT LR probe: lr=%g ran %d of qat.lr_probe.steps=%d steps", lr, count.steps, asked)
        return metric

    result = probe_qat_lr(train, float, q.lr_probe.lrs, higher_is_better=s.higher_is_better)
    table = render_lr_probe(result, s.monitor)
    for row in result.rows:
        note = f"{steps[row.lr]} steps" + (", chosen" if row.lr == result.best_lr else "")
        pipe.result(f"lr probe {row.lr:g}", recipe, row.metric, None, None, None, out, note)
    ran = _steps_text(steps)
    short = "" if min(steps.values()) >= asked else f"; fewer than qat.lr_probe.steps={asked}"
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "lr_probe.md", f"# QAT LR probe ({ran}{short}, constant LR)\n\n{table}\n")
        _log_tensorboard(pipe, out, result, table, steps)
    probes = ", ".join(f"{r.lr:g}: {r.metric:.4f}" for r in result.rows)
    pipe.decide(
        f"QAT LR probe ({ran}{short}, fixed LR): {probes}; QAT uses lr={result.best_lr:g} "
        f"({result.best_metric:.4f}) with qat.scheduler={q.scheduler.value}"
    )
    log.info("QAT LR probe:\n%s", table)
    return result.best_lr
