"""Shared plumbing of the callbacks: reach the network, feed batches, find data and the log dir, write files.

Nothing here holds state; every function takes the trainer / module it works on. Hooks of the callbacks call
these helpers and the plain-torch core, so each hook stays a few lines long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from torch import nn

from qat_lightning.files import write_atomic
from qat_lightning.quant.calibrate import (
    CALIBRATED_FLAG,
    ensure_calibrated_flag,
    is_calibrated,
    preserved_modes,
)
from qat_lightning.quant.inputs import InputFn, ModelInputs, call_model, default_input_fn, normalize_inputs
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize

__all__ = [
    "CALIBRATED_FLAG",
    "ChainedLoaders",
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
    "request_dataloader",
    "batch_transfer",
    "first_batch",
    "switch_states",
    "preserved_modes",
    "broadcast_module_state",
    "check_choice",
]


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


# ----------------------------------------------------------------------------------------------- files
def resolve_log_dir(trainer: pl.Trainer) -> Path:
    """Return the run's log dir (``trainer.log_dir``, else ``default_root_dir``).

    Must be called on every rank: Lightning broadcasts the directory from rank zero.
    """
    log_dir = trainer.log_dir
    return Path(log_dir if log_dir is not None else trainer.default_root_dir)


def write_text_rank_zero(trainer: pl.Trainer, path: Path, text: str) -> None:
    """Atomically write ``text`` on global rank zero only."""
    if trainer.is_global_zero:
        write_atomic(path, text)


# ----------------------------------------------------------------------------------------------- data
DATALOADER_CHOICES = ("train", "val", "test")


def _trainer_loader(trainer: pl.Trainer, which: str) -> Any:
    """Return the loader the trainer already set up for that split (``None`` before its loop did)."""
    return {
        "train": trainer.train_dataloader,
        "val": trainer.val_dataloaders,
        "test": trainer.test_dataloaders,
    }[which]


def _loader_source(trainer: pl.Trainer, which: str) -> Any:
    """Where the trainer's loop will take that split's loaders from (Lightning's ``_DataLoaderSource``).

    It holds the loaders passed to ``fit`` / ``validate`` / ``test``, else the attached datamodule, else the
    LightningModule, exactly as the loop itself will resolve them once it starts.
    """
    if which == "train":
        return trainer.fit_loop._data_source
    if which == "test":
        return trainer.test_loop._data_source
    if trainer.state.fn == TrainerFn.FITTING:
        return trainer.fit_loop.epoch_loop.val_loop._data_source
    return trainer.validate_loop._data_source


def _source_loader(trainer: pl.Trainer, which: str) -> Any:
    """Ask the split's data source for its loaders (``None`` when that source defines none)."""
    source = _loader_source(trainer, which)
    if source.instance is None or not source.is_defined():
        return None
    return _request_dataloader(source)


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


def _is_loader(obj: Any) -> bool:
    """Whether ``obj`` is one loader (an iterable of batches), not a batch or a collection of loaders."""
    if isinstance(obj, (torch.utils.data.DataLoader, CombinedLoader)):
        return True
    if isinstance(obj, (torch.Tensor, str, bytes, Mapping, list, tuple)) or hasattr(obj, "__array__"):
        return False  # a batch (tensor, array, tuple, dict) or a collection
    return isinstance(obj, Iterable)


def _leaf_loaders(loaders: Any) -> list[Any]:
    """Flatten what a ``*_dataloader()`` hook returned into its loaders, in order.

    A dict gives its values, a list / tuple of loaders its elements, a ``CombinedLoader`` its ``iterables``
    (what it was built from), recursively; anything else (one loader, a list of batches) is one loader.
    """
    if isinstance(loaders, CombinedLoader):
        return _leaf_loaders(loaders.iterables)
    if isinstance(loaders, Mapping):
        return [leaf for value in loaders.values() for leaf in _leaf_loaders(value)]
    if isinstance(loaders, (list, tuple)) and loaders and all(_is_collection(x) for x in loaders):
        return [leaf for value in loaders for leaf in _leaf_loaders(value)]
    return [] if loaders is None else [loaders]


def _is_collection(obj: Any) -> bool:
    """Whether ``obj`` is a loader or a (nested) collection of loaders, as a list element."""
    if isinstance(obj, (list, tuple)):
        return bool(obj) and all(_is_collection(x) for x in obj)
    return _is_loader(obj) or (isinstance(obj, Mapping) and all(_is_collection(x) for x in obj.values()))


class ChainedLoaders:
    """Several loaders read one after the other, as one iterable of batches.

    ``len()`` is the sum of their lengths (a ``TypeError`` when one has none), so ``num_batches`` counts
    across them.
    """

    def __init__(self, loaders: Sequence[Any]) -> None:
        self.loaders = list(loaders)

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            yield from loader

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)


def _as_one_loader(loaders: Any, prepare: Callable[[Any], Any] = lambda loader: loader) -> Any:
    """One iterable over every loader of ``loaders`` (``None`` when there is none; a single one as is)."""
    leaves = [prepare(leaf) for leaf in _leaf_loaders(loaders)]
    if not leaves:
        return None
    return leaves[0] if len(leaves) == 1 else ChainedLoaders(leaves)


def request_dataloader(
    trainer: pl.Trainer, pl_module: pl.LightningModule, which: str | Iterable[Any], *, whole: bool = False
) -> Any:
    """Return the batches a callback should read.

    Args:
        trainer: the running trainer.
        pl_module: the LightningModule.
        which: an iterable of batches (used as is), or ``"train"`` / ``"val"`` / ``"test"``: the loader the
            trainer already set up for that split, else the one its loop will use: the loaders passed to
            ``trainer.fit(module, train_loader, val_loader)`` (or ``validate`` / ``test``), else the
            attached datamodule's, else the LightningModule's own ``*_dataloader()`` hook. Under multi-process
            strategies a map-style loader that lacks one gets a ``DistributedSampler`` so each rank reads a
            different shard. Several loaders for the split (a list or dict of them, or a ``CombinedLoader``,
            nested or not) are read one after the other, in their order, as one iterable whose length is
            the sum of theirs: a ``num_batches`` limit counts across them. One loader is returned as is.
        whole: for a reader on one rank only (an export check): under multi-process strategies, the split's
            loaders as their source gives them, unsharded (the trainer's own are sharded per rank); the
            trainer's are used when the source defines none.

    Returns:
        The split's loader, a :class:`ChainedLoaders` over its several loaders, or ``which`` itself.

    Raises:
        ValueError: when no loader for that split can be found (the message says what to pass instead).
    """
    if not isinstance(which, str):
        return which
    check_choice("dataloader", which, DATALOADER_CHOICES)
    unsharded = whole and trainer.world_size > 1
    loader = _as_one_loader(_source_loader(trainer, which)) if unsharded else None
    if loader is None:
        loader = _as_one_loader(_trainer_loader(trainer, which))
    if loader is None:
        loader = _as_one_loader(
            _source_loader(trainer, which),
            (lambda leaf: leaf) if unsharded else lambda leaf: _distributed(trainer, leaf),
        )
        if loader is None:
            hook = f"{which}_dataloader"
            raise ValueError(
                f"no {which!r} dataloader is available here: pass it to trainer.fit/validate/test, attach a "
                f"LightningDataModule with {hook}(), define {type(pl_module).__name__}.{hook}(), or pass the "
                "batches (any iterable) directly"
            )
    return loader


def batch_transfer(trainer: pl.Trainer) -> Callable[[Any], Any]:
    """Prepare a batch the way Lightning's loops do: move it to the device, then convert it for the precision.

    ``trainer.precision_plugin.convert_input`` casts floating-point tensors for the ``*-true`` precisions
    (a ``bf16-true`` model gets bf16 inputs); other tensors pass unchanged.
    """

    def transfer(batch: Any) -> Any:
        return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))

    return transfer


def first_batch(loader: Iterable[Any]) -> Any:
    """Return the first batch of ``loader`` (a clear error when it is empty)."""
    for batch in loader:
        return batch
    raise ValueError("the dataloader is empty: cannot take example inputs or calibration batches from it")
