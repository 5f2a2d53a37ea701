"""The ``lightning.Trainer`` arguments the stages set themselves, and a run's length.

``trainer.*`` (``conf/trainer/*.yaml``) holds the user's ``lightning.Trainer`` arguments; every stage adds
its own (the run dir, the logger, its callbacks, its length and batch limits). A ``trainer.*`` key that a
stage sets would be replaced silently, so :func:`stage_trainer_problems` refuses it before anything runs,
naming the config key that sets it (an equal value of a fixed setting is accepted).

:func:`trainer_problems` builds a ``lightning.Trainer`` from ``trainer.*`` as the stages do (it writes
nothing) and turns a refusal (``devices=0``, ``precision=17``, an unknown accelerator, one this machine
lacks) into a config problem naming the ``trainer.<key>`` at fault; the preflight runs it before anything
else.

:func:`run_length` is the rule for every ``max_epochs`` / ``max_steps`` pair of the config
(``train.*``, ``qat.*``): ``max_steps > 0`` wins (the run is not cut by ``max_epochs``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["STAGE_TRAINER_KEYS", "run_length", "stage_trainer_problems", "trainer_problems"]

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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's banners and warnings while a probe Trainer is built (the stages' repeat them)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _refusal(args: Mapping[str, Any], progress: bool) -> Exception | None:
    """Build ``lightning.Trainer`` with ``args`` and the stages' fixed settings; return its error, if any."""
    import lightning

    stage_args = {**_fixed_values(progress), "logger": False, "callbacks": []}
    with _quiet():
        try:
            lightning.Trainer(**{**args, **stage_args})
        except Exception as err:  # noqa: BLE001 - any refusal is the user's config to explain
            return err
    return None


def trainer_problems(trainer: Mapping[str, Any], progress: bool) -> list[str]:
    """Return the problem (one line, or none) of building ``lightning.Trainer`` from ``trainer.*``.

    The line names each key whose removal (Lightning's default in its place) alone lets the Trainer be
    built, else every key given; it quotes Lightning's message.

    Args:
        trainer: the composed ``trainer`` section.
        progress: the config's ``progress`` (the stages' ``enable_progress_bar``).
    """
    error = _refusal(trainer, progress)
    if error is None:
        return []
    without = ({o: v for o, v in trainer.items() if o != k} for k in trainer)
    culprits = [k for k, args in zip(trainer, without, strict=True) if _refusal(args, progress) is None]
    if culprits:
        where = " / ".join(f"trainer.{k}={trainer[k]!r}" for k in culprits)
        fix = f"fix or drop {' / '.join(f'trainer.{k}' for k in culprits)}"
    else:
        where = f"trainer ({', '.join(f'{k}={v!r}' for k, v in trainer.items())})"
        fix = "fix the trainer.* arguments or pick another trainer="
    message = " ".join(str(error).split()) or type(error).__name__
    return [f"{where}: lightning.Trainer refuses it: {message}; {fix}"]


def run_length(max_epochs: int, max_steps: int) -> dict[str, int]:
    """Return the ``lightning.Trainer`` length arguments: ``max_steps > 0`` wins over ``max_epochs``.

    Args:
        max_epochs: epochs (``-1``: by steps).
        max_steps: optimizer steps (``-1``: by epochs); ``> 0`` sets ``max_epochs=-1`` (no epoch cap).
    """
    return {"max_epochs": -1 if max_steps > 0 else max_epochs, "max_steps": max_steps}
