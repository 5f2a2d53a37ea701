"""Shared plumbing of the callbacks: reach the network, feed batches, find data and the log dir, write files.

Nothing here holds state; every function takes the trainer / module it works on. Hooks of the callbacks call
these helpers and the plain-torch core, so each hook stays a few lines long.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from qat_lightning.analysis.inputs import InputFn, ModelInputs, call_model, default_input_fn, normalize_inputs
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize

__all__ = [
    "CALIBRATED_FLAG",
    "InputFn",
    "ModelInputs",
    "default_input_fn",
    "normalize_inputs",
    "call_model",
    "get_submodule",
    "set_submodule",
    "is_prepared",
    "require_prepared",
    "ensure_calibrated_flag",
    "is_calibrated",
    "resolve_log_dir",
    "write_text_rank_zero",
    "atomic_write_text",
    "request_dataloader",
    "first_batch",
    "switch_states",
    "preserved_modes",
    "broadcast_module_state",
    "check_choice",
]

CALIBRATED_FLAG = "qat_calibrated"
"""Name of the bool buffer on a prepared model that records that calibration ran (survives checkpoints)."""


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError listing the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(repr(a) for a in allowed)}")
    return value


# ----------------------------------------------------------------------------------------------- modules
def get_submodule(pl_module: nn.Module, path: str) -> nn.Module:
    """``pl_module.<path>`` (dotted paths allowed); a clear error listing the children when it is missing."""
    if path in ("", "."):
        return pl_module
    try:
        module = pl_module.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in pl_module.named_children()) or "(none)"
        raise ValueError(
            f"{type(pl_module).__name__} has no submodule {path!r} (its children: {children}); "
            "pass submodule=<attribute name of your network>"
        ) from None
    return module


def set_submodule(pl_module: nn.Module, path: str, module: nn.Module) -> None:
    """Replace ``pl_module.<path>`` by ``module``."""
    if path in ("", "."):
        raise ValueError("cannot replace the LightningModule itself; pass submodule=<attribute name>")
    parent_path, _, leaf = path.rpartition(".")
    parent = get_submodule(pl_module, parent_path) if parent_path else pl_module
    setattr(parent, leaf, module)


def is_prepared(model: nn.Module) -> bool:
    """Return whether ``model`` already holds quant nodes (prepared by ``prepare`` or by hand)."""
    return any(isinstance(m, FakeQuantize) for m in model.modules())


def require_prepared(model: nn.Module, who: str, submodule: str) -> None:
    """Raise a clear error when ``model`` holds no quant nodes (``who`` names the callback)."""
    if not is_prepared(model):
        raise ValueError(
            f"{who}: `{submodule}` has no quant nodes; add PrepareQuantization(...) to the trainer's "
            "callbacks (or prepare the network yourself before fitting)"
        )


def _fill_missing_flag(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: a checkpoint saved before the flag existed still loads strictly.

    The flag is then derived from the checkpoint itself: calibrated when every quant node has a ready scale.
    """
    key = prefix + CALIBRATED_FLAG
    if key in state_dict:
        return
    ready = [v for k, v in state_dict.items() if k.startswith(prefix) and k.endswith("scale_ready")]
    state_dict[key] = torch.tensor(bool(ready) and all(bool(v) for v in ready))


def ensure_calibrated_flag(model: nn.Module) -> torch.Tensor:
    """Register the ``qat_calibrated`` buffer on a prepared model (idempotent) and return it.

    A load-state-dict pre-hook fills the flag in for checkpoints that predate it, so strict loading works.
    """
    flag = getattr(model, CALIBRATED_FLAG, None)
    if isinstance(flag, torch.Tensor):
        return flag
    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    model.register_buffer(CALIBRATED_FLAG, torch.tensor(False, device=device))
    model.register_load_state_dict_pre_hook(_fill_missing_flag)
    return getattr(model, CALIBRATED_FLAG)


def is_calibrated(model: nn.Module) -> bool:
    """Value of the ``qat_calibrated`` buffer (False when absent)."""
    flag = getattr(model, CALIBRATED_FLAG, None)
    return bool(flag) if isinstance(flag, torch.Tensor) else False


def switch_states(
    model: nn.Module, from_states: Iterable[FakeQuantState], to_state: FakeQuantState
) -> list[tuple[FakeQuantize, FakeQuantState]]:
    """Move nodes in one of ``from_states`` to ``to_state``; return the ``(node, old state)`` pairs."""
    sources = set(from_states)
    changed = []
    for _, node in iter_fake_quantize(model):
        if node.state in sources and node.state is not to_state:
            changed.append((node, node.state))
            node.state = to_state
    return changed


def broadcast_module_state(trainer: pl.Trainer, module: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` from rank ``src`` to all ranks (no-op on one process).

    What DDP does at each forward (``broadcast_buffers``), done once at a phase boundary so every rank
    ends a phase with the same quant state as the checkpoint (which rank zero writes).
    """
    if trainer.world_size <= 1 or not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return
    for buf in module.buffers():
        carrier = buf.to(torch.uint8) if buf.dtype == torch.bool else buf
        torch.distributed.broadcast(carrier, src=src)
        if carrier is not buf:
            buf.copy_(carrier.to(torch.bool))


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag and every quant node's state on exit (also on error)."""
    modes = [(m, m.training) for m in model.modules()]
    states = [(node, node.state) for _, node in iter_fake_quantize(model)]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for node, state in states:
            node.state = state


# ----------------------------------------------------------------------------------------------- files
def resolve_log_dir(trainer: pl.Trainer) -> Path:
    """Return the run's log dir (``trainer.log_dir``, else ``default_root_dir``).

    Must be called on every rank: Lightning broadcasts the directory from rank zero.
    """
    log_dir = trainer.log_dir
    return Path(log_dir if log_dir is not None else trainer.default_root_dir)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_rank_zero(trainer: pl.Trainer, path: Path, text: str) -> None:
    """Atomically write ``text`` on global rank zero only."""
    if trainer.is_global_zero:
        atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------- data
_STAGE_LOADER = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}
DATALOADER_CHOICES = ("train", "val", "test")


def _trainer_loader(trainer: pl.Trainer, which: str) -> Any:
    loaders = {
        "train": trainer.train_dataloader,
        "val": trainer.val_dataloaders,
        "test": trainer.test_dataloaders,
    }[which]
    return loaders


def _distributed(trainer: pl.Trainer, loader: Any) -> Any:
    """Give a map-style DataLoader a DistributedSampler (no shuffling) so every rank sees its own shard."""
    if trainer.world_size <= 1 or not isinstance(loader, torch.utils.data.DataLoader):
        return loader
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        return loader
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or loader.batch_size is None:
        return loader
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def _first_loader(loaders: Any) -> Any:
    """Return the first loader of what a ``*_dataloader()`` hook returned (a loader, list or dict)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)) and loaders and isinstance(loaders[0], torch.utils.data.DataLoader):
        return loaders[0]
    return loaders


def request_dataloader(trainer: pl.Trainer, pl_module: pl.LightningModule, which: str | Iterable[Any]) -> Any:
    """Return the batches a callback should read.

    Args:
        trainer: the running trainer.
        pl_module: the LightningModule.
        which: an iterable of batches (used as is), or ``"train"`` / ``"val"`` / ``"test"``: the loader the
            trainer already set up for that split, else the attached datamodule's, else the LightningModule's
            own ``*_dataloader()`` hook. Under multi-process strategies a map-style loader that lacks one gets
            a ``DistributedSampler`` so each rank reads a different shard.

    Raises:
        ValueError: when no loader for that split can be found (the message says what to pass instead).
    """
    if not isinstance(which, str):
        return which
    check_choice("dataloader", which, DATALOADER_CHOICES)
    loader = _first_loader(_trainer_loader(trainer, which))
    if loader is None:
        hook = _STAGE_LOADER[which]
        source = None
        if trainer.datamodule is not None and is_overridden(hook, trainer.datamodule):
            source = trainer.datamodule
        elif is_overridden(hook, pl_module):
            source = pl_module
        if source is None:
            raise ValueError(
                f"no {which!r} dataloader is available here: attach a LightningDataModule with {hook}(), "
                f"define {type(pl_module).__name__}.{hook}(), or pass the batches (any iterable) directly"
            )
        loader = _first_loader(getattr(source, hook)())
        loader = _distributed(trainer, loader)
    return loader


def first_batch(loader: Iterable[Any]) -> Any:
    """Return the first batch of ``loader`` (a clear error when it is empty)."""
    for batch in loader:
        return batch
    raise ValueError("the dataloader is empty: cannot take example inputs or calibration batches from it")
