"""Checks that need the user's model and checkpoints, run before any training (``stage=...`` start).

A user's mistake must cost seconds, not a training run: :func:`preflight` first builds a ``lightning.Trainer``
from ``trainer.*`` (a refused value, ``trainer.devices=0``, is a problem naming the key:
:func:`~qat_lightning.app.trainer_args.trainer_problems`), then builds the LightningModule once
and checks that ``prepare.submodule`` names an ``nn.Module`` in it, that the stage's checkpoint exists and
is of the right kind (float for calibration / troubleshoot / pipeline, calibration for qat / analysis),
that a quantized checkpoint was calibrated for this run's ``chip`` and ``prepare.qat_mode`` /
``prepare.method``, and, with one validation batch, that the model logs ``target.metric``. Every problem
found is listed in one :class:`ConfigError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qat_lightning.app.checkpoints import read_checkpoint_info
from qat_lightning.app.config_checks import ConfigError
from qat_lightning.app.schema import PrepareConf, StageName
from qat_lightning.app.trainer_args import trainer_problems

if TYPE_CHECKING:
    from qat_lightning.app.pipeline import Pipeline

__all__ = ["CKPT_KIND", "checkpoint_problems", "preflight"]

log = logging.getLogger("qat_lightning")

CKPT_KIND: dict[StageName, str] = {
    StageName.calibration: "float",
    StageName.troubleshoot: "float",
    StageName.qat: "calibration",
    StageName.analysis: "calibration",
    StageName.export: "calibration",
}
"""The checkpoint kind each stage starts from (``stage=pipeline`` only with ``ckpt=``: float)."""

_KINDS_ACCEPTED = {"float": ("float",), "calibration": ("calibration", "qat")}


def _submodule_problem(lit: Any, path: str) -> str | None:
    node: Any = lit
    for part in path.split("."):
        node = getattr(node, part, None)
    if isinstance(node, nn.Module):
        return None
    children = ", ".join(name for name, _ in lit.named_children()) or "(none)"
    return (
        f"prepare.submodule={path!r}: {type(lit).__name__} has no nn.Module attribute {path!r}; "
        f"its submodules: {children}"
    )


def _prepare_problem(path: Path, ckpt: Any, prepare: PrepareConf) -> str | None:
    """Check the ``PrepareQuantization`` settings in the checkpoint against ``prepare.*``."""
    from qat_lightning.callbacks.prepared_model import (
        checkpoint_prepare_state,
        prepare_settings_error,
        prepare_settings_mismatch,
    )

    stored = checkpoint_prepare_state(ckpt, prepare.submodule) or {}
    ours = {"qat_mode": prepare.qat_mode.value, "method": prepare.method.value}
    mismatch = prepare_settings_mismatch(stored, ours)
    if not mismatch:
        return None
    fix = " ".join(f"prepare.{key}={theirs}" for key, (theirs, _) in mismatch.items())
    hint = f"pass {fix} (its scales were calibrated that way), or calibrate the float model with this run's"
    return str(prepare_settings_error(f"ckpt={path}", mismatch, "this run has", hint))


def checkpoint_problems(
    path: Path, kind: str, chip: str, stage: str, prepare: PrepareConf | None = None
) -> list[str]:
    """Return what is wrong with ``path`` as the ``kind`` checkpoint of ``stage`` on ``chip``.

    Args:
        path: the checkpoint.
        kind: ``float`` or ``calibration``.
        chip: the run's chip.
        stage: the stage name (for the messages).
        prepare: the run's ``prepare`` config: a quantized checkpoint made with another ``qat_mode`` /
            ``method`` is refused (``None``: not checked).
    """
    try:
        ckpt, info = read_checkpoint_info(path)
    except Exception as err:  # noqa: BLE001 - an unreadable file is the user's mistake to explain
        return [f"ckpt={path}: cannot be read as a checkpoint ({type(err).__name__}: {err})"]
    if info is None:
        if kind == "float":
            return []  # any Lightning checkpoint of the model holds float weights
        return [
            f"ckpt={path}: not written by a qat-lightning calibration/qat stage (no recorded recipe); "
            f"stage={stage} needs checkpoints/calibration.ckpt of stage=calibration"
        ]
    if info.kind not in _KINDS_ACCEPTED[kind]:
        return [
            f"ckpt={path}: a {info.kind} checkpoint; stage={stage} needs a {kind} checkpoint "
            f"(checkpoints/{kind}.ckpt)"
        ]
    if info.recipe is not None and info.recipe.chip != chip:
        return [
            f"ckpt={path}: calibrated for chip={info.recipe.chip}, this run targets chip={chip}; "
            f"pass chip={info.recipe.chip}, or calibrate the float model for {chip}"
        ]
    problem = None if prepare is None or kind == "float" else _prepare_problem(path, ckpt, prepare)
    return [problem] if problem else []


def _metric_problem(pipe: Pipeline, lit: Any) -> str | None:
    session = pipe.session
    trainer = session.trainer(
        session.run_dir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    results = trainer.validate(lit, datamodule=session.datamodule(), verbose=False)
    logged = {*(results[0] if results else {}), *trainer.callback_metrics}
    if session.monitor in logged:
        return None
    return (
        f"target.metric={session.monitor!r} is not logged by {type(lit).__name__}.validation_step; logged: "
        f"{', '.join(sorted(logged)) or '(none)'}; set target.metric=<one of them> (target.mode=min: a loss)"
    )


def preflight(pipe: Pipeline) -> None:
    """Check the model, the checkpoint and the metric of a run before it trains anything.

    Args:
        pipe: the run (its session holds the config and the factories).

    Raises:
        ConfigError: listing every problem found.
    """
    cfg = pipe.cfg
    stage = cfg.stage.name
    problems = trainer_problems(cfg.trainer, cfg.progress)  # first: the checks below build a Trainer
    lit = pipe.session.new_model()
    problems += [p for p in [_submodule_problem(lit, cfg.prepare.submodule)] if p]
    kind = CKPT_KIND.get(stage, "float" if stage is StageName.pipeline and cfg.ckpt else None)
    if kind is not None:
        try:
            path = pipe.resolve_ckpt(kind)
        except FileNotFoundError as err:
            problems.append(str(err))
        else:
            problems += checkpoint_problems(path, kind, pipe.chip, stage.value, cfg.prepare)
    if not problems:
        problems += [p for p in [_metric_problem(pipe, lit)] if p]
    if problems:
        lines = "\n  ".join(problems)
        raise ConfigError(f"stage={stage.value} cannot start ({len(problems)} problem(s)):\n  {lines}")
