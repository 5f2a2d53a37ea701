"""The seed's QAT learning-rate probe inside the app (``qat.lr_probe=[1e-3,1e-4,1e-5]``).

Each candidate is a short QAT run from the calibration checkpoint at a fixed LR (``constant``: no warmup,
no decay, ``qat.lr_probe_steps`` steps), scored on the validation data; the best LR then trains the real
QAT run with ``qat.scheduler`` (the float run's decay shape, no warmup). The table goes into the step's
``lr_probe.md``, the summary (one row per candidate and a decision) and TensorBoard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qat_lightning.analysis.advice.lr import LrProbeResult, probe_qat_lr, render_lr_probe

__all__ = ["run_lr_probe"]

log = logging.getLogger("qat_lightning")


def _log_tensorboard(pipe: Any, out: Path, result: LrProbeResult, table: str) -> None:
    logger = pipe.session.factories.logger(out)
    writer = getattr(logger, "experiment", None) if logger is not None else None
    if writer is None or not hasattr(writer, "add_scalar"):
        return
    for i, row in enumerate(result.rows):
        writer.add_scalar(f"lr_probe/{pipe.session.monitor}", row.metric, i)
        writer.add_scalar("lr_probe/lr", row.lr, i)
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
    if not q.lr_probe:
        return None
    s = pipe.session
    out = pipe.step("lr_probe", f"QAT LR probe ({', '.join(f'{lr:g}' for lr in q.lr_probe)})")

    def train(lr: float) -> float:
        _, metric, _, _ = s.qat(
            calib_ckpt,
            out / f"lr_{lr:g}",
            name="",
            lr=lr,
            scheduler="constant",
            max_epochs=1,
            max_steps=q.lr_probe_steps,
        )
        return metric

    result = probe_qat_lr(train, float, q.lr_probe, higher_is_better=s.higher_is_better)
    table = render_lr_probe(result, s.monitor)
    for row in result.rows:
        note = "chosen" if row.lr == result.best_lr else ""
        pipe.result(f"lr probe {row.lr:g}", recipe, row.metric, None, None, None, out, note)
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / "lr_probe.md").write_text(
            f"# QAT LR probe ({q.lr_probe_steps} steps per LR, constant LR)\n\n{table}\n", encoding="utf-8"
        )
        _log_tensorboard(pipe, out, result, table)
    probes = ", ".join(f"{r.lr:g}: {r.metric:.4f}" for r in result.rows)
    pipe.decide(
        f"QAT LR probe ({q.lr_probe_steps} steps each, fixed LR): {probes}; QAT uses lr={result.best_lr:g} "
        f"({result.best_metric:.4f}) with qat.scheduler={q.scheduler.value}"
    )
    log.info("QAT LR probe:\n%s", table)
    return result.best_lr
