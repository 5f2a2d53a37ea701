"""The ``lightning.Trainer`` arguments the stages set themselves, and a run's length.

``trainer.*`` (``conf/trainer/*.yaml``) holds the user's ``lightning.Trainer`` arguments; every stage adds
its own (the run dir, the logger, its callbacks, its length and batch limits). A ``trainer.*`` key that a
stage sets would be replaced silently, so :func:`stage_trainer_problems` refuses it before anything runs,
naming the config key that sets it (an equal value of a fixed setting is accepted).

:func:`run_length` is the rule for every ``max_epochs`` / ``max_steps`` pair of the config
(``train.*``, ``qat.*``): ``max_steps > 0`` wins (the run is not cut by ``max_epochs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["STAGE_TRAINER_KEYS", "run_length", "stage_trainer_problems"]

_LENGTH = "train.max_epochs / train.max_steps (float training), qat.max_epochs / qat.max_steps (QAT)"

STAGE_TRAINER_KEYS: dict[str, str] = {
    "max_epochs": _LENGTH,
    "max_steps": _LENGTH,
    "limit_train_batches": "train.limit_train_batches (float training and QAT)",
    "limit_val_batches": "train.limit_val_batches (validation) and search.eval_batches (search probes)",
    "callbacks": "callbacks.<name>.* (conf/callbacks/*.yaml): each stage builds its own callbacks",
    "logger": "logger=tensorboard|none (conf/logger/*.yaml): each step logs into its own directory",
    "default_root_dir": "hydra.run.dir=<dir> (the run dir; the pipeline's steps get sub-directories)",
    "enable_checkpointing": "nothing: the stages save checkpoints/<name>.ckpt themselves (false only)",
    "enable_progress_bar": "progress=true|false",
    "num_sanity_val_steps": "nothing: the stages validate themselves (0 only)",
}
"""``lightning.Trainer`` arguments a stage sets, with the config that sets them instead."""


def _fixed_values(progress: bool) -> dict[str, Any]:
    """Return the keys every trainer gets the same value for (an equal ``trainer.*`` value is harmless)."""
    return {"enable_checkpointing": False, "enable_progress_bar": progress, "num_sanity_val_steps": 0}


def stage_trainer_problems(trainer: Mapping[str, Any], progress: bool) -> list[str]:
    """Return one line per ``trainer.*`` key a stage would replace (:data:`STAGE_TRAINER_KEYS`).

    Args:
        trainer: the composed ``trainer`` section.
        progress: the config's ``progress`` (``enable_progress_bar`` equal to it is accepted).
    """
    fixed = _fixed_values(progress)
    problems = []
    for key, instead in STAGE_TRAINER_KEYS.items():
        if key not in trainer or (key in fixed and trainer[key] == fixed[key]):
            continue
        problems.append(
            f"trainer.{key}={trainer[key]!r}: the stages set {key} themselves, which would replace it; "
            f"drop it and use {instead}"
        )
    return problems


def run_length(max_epochs: int, max_steps: int) -> dict[str, int]:
    """Return the ``lightning.Trainer`` length arguments: ``max_steps > 0`` wins over ``max_epochs``.

    Args:
        max_epochs: epochs (``-1``: by steps).
        max_steps: optimizer steps (``-1``: by epochs); ``> 0`` sets ``max_epochs=-1`` (no epoch cap).
    """
    return {"max_epochs": -1 if max_steps > 0 else max_epochs, "max_steps": max_steps}
