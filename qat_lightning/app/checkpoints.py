"""The app's record inside its checkpoints, and the rank helpers the app needs under DDP.

Every checkpoint the app writes carries ``checkpoint["qat_lightning"]``: its kind (``float``,
``calibration``, ``qat``), the decided :class:`~qat_lightning.app.recipes.Recipe`, the metric measured when
it was written, the float model's metric and the float training's step count. A later stage rebuilds the
exact qconfig from it (``stage=qat ckpt=...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from qat_lightning.app.recipes import Recipe

__all__ = [
    "APP_KEY",
    "CheckpointInfo",
    "Record",
    "barrier",
    "calibration_batches",
    "calibration_record",
    "is_rank_zero",
    "read_checkpoint_info",
    "restore_float_records",
]

APP_KEY = "qat_lightning"
"""Key of the app's record inside every checkpoint it writes."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the app recorded in one of its checkpoints.

    Attributes:
        kind: ``float``, ``calibration`` or ``qat``.
        recipe: the decided recipe (``None`` for float checkpoints).
        metric: the metric measured when it was written.
        float_metric: the float model's metric.
        float_steps: optimizer steps of the float training (for the QAT step budget check).
    """

    kind: str
    recipe: Recipe | None = None
    metric: float | None = None
    float_metric: float | None = None
    float_steps: int | None = None


class Record(Callback):
    """Add the app's :class:`CheckpointInfo` to every checkpoint the trainer saves."""

    def __init__(self, info: CheckpointInfo) -> None:
        self.info = info

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Write ``self.info`` under ``checkpoint["qat_lightning"]``."""
        info = self.info
        checkpoint[APP_KEY] = {
            "kind": info.kind,
            "recipe": None if info.recipe is None else info.recipe.to_dict(),
            "metric": info.metric,
            "float_metric": info.float_metric,
            "float_steps": info.float_steps,
        }


def is_rank_zero() -> bool:
    """Whether this process is global rank zero (always true without distributed training)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def barrier() -> None:
    """Wait for every rank (no-op without an initialized process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_checkpoint_info(path: Path) -> tuple[dict[str, Any], CheckpointInfo | None]:
    """Load a checkpoint (CPU) and the app's record in it (``None`` for foreign checkpoints).

    Raises:
        FileNotFoundError: when the file does not exist.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    raw = ckpt.get(APP_KEY) if isinstance(ckpt, dict) else None
    if not raw:
        return ckpt, None
    recipe = Recipe.from_dict(raw["recipe"]) if raw.get("recipe") else None
    return ckpt, CheckpointInfo(
        raw.get("kind", "?"), recipe, raw.get("metric"), raw.get("float_metric"), raw.get("float_steps")
    )


def calibration_record(checkpoint: Any, submodule: str | None = None) -> tuple[int, str | None] | None:
    """Return ``(batches, dataloader)`` that calibrated the checkpoint's network (its ``Calibration`` state).

    ``Calibration.state_dict`` keeps ``batches_used`` (per rank) and its ``dataloader`` (``train`` / ``val``
    / ``test`` / ``custom``) under the key ``Calibration{'submodule': ...}``. A checkpoint of a run that did
    not calibrate (a QAT run restores a calibrated network: ``batches_used`` 0) or saved without the
    callback does not record it.

    Args:
        checkpoint: the loaded checkpoint (:func:`read_checkpoint_info`'s first value).
        submodule: the prepared submodule (``prepare.submodule``); ``None``: any.

    Returns:
        The batch count and the loader (``None`` when not recorded), or ``None`` where the checkpoint does
        not record a calibration (or records several different ones).
    """
    states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    found = set()
    for key, state in (states or {}).items():
        if not str(key).startswith("Calibration{") or not isinstance(state, Mapping):
            continue
        if submodule is not None and not str(key).endswith(repr({"submodule": submodule})):
            continue
        used = state.get("batches_used")
        if isinstance(used, int) and not isinstance(used, bool) and used > 0:
            loader = state.get("dataloader")
            found.add((used, loader if isinstance(loader, str) else None))
    return found.pop() if len(found) == 1 else None


def calibration_batches(checkpoint: Any, submodule: str | None = None) -> int | None:
    """Return how many batches calibrated the checkpoint's network (:func:`calibration_record`).

    Returns:
        The batch count, or ``None`` where the checkpoint does not record it (or records several).
    """
    record = calibration_record(checkpoint, submodule)
    return None if record is None else record[0]


def restore_float_records(lit: L.LightningModule, checkpoint: Any, submodule: str) -> bool:
    """Attach the float records a checkpoint carries to ``lit.<submodule>`` (loaded from it, prepared).

    The PTQ callbacks save, under ``checkpoint["qat_lightning_ptq"]``, the float values AdaRound / bias
    correction overwrote (not in the ``state_dict``); with them attached, the analysis and search of the
    loaded network measure against the original float model (:func:`qat_lightning.ptq.float_reference`).

    Returns:
        Whether records were attached.
    """
    from qat_lightning.ptq import PTQ_CHECKPOINT_KEY, load_float_record_state

    saved = checkpoint.get(PTQ_CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
    records = (saved or {}).get(submodule)
    if not records:
        return False
    load_float_record_state(lit.get_submodule(submodule), records)
    return True
