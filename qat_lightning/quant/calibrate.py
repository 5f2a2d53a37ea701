"""Calibration in plain torch: feed batches forward-only, record that it ran, refuse uncalibrated models.

A plain-torch user calibrates with::

    ql.calibrate(qat_model, loader, num_batches=100)   # CALIBRATION state, eval mode, no grad
    ql.require_calibrated(qat_model, "my QAT loop")    # one clear error when calibration never ran

The model's ``qat_calibrated`` bool buffer records that calibration ran; it lives in the ``state_dict`` so a
resumed run or a reloaded checkpoint never recalibrates. Under ``torch.distributed`` each rank calibrates on
its own shard and :func:`reduce_observer_statistics` all-reduces the statistics afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from qat_lightning.quant.checks import require_count, require_module
from qat_lightning.quant.drift import BN_SHIFT_LIMIT, DataDrift, DataDriftMeter
from qat_lightning.quant.inputs import InputFn, call_model, default_input_fn, normalize_inputs
from qat_lightning.quant.nodes.fake_quantize import (
    FakeQuantize,
    FakeQuantState,
    iter_fake_quantize,
    set_fake_quantize,
)

__all__ = [
    "BN_SHIFT_LIMIT",
    "CALIBRATED_FLAG",
    "CalibrationError",
    "DataDrift",
    "DataDriftMeter",
    "EXTREME_RANGE",
    "UncalibratedModelError",
    "calibrate",
    "ensure_calibrated_flag",
    "is_calibrated",
    "preserved_modes",
    "reduce_observer_statistics",
    "require_calibrated",
    "restored_on_error",
    "uncalibrated_nodes",
    "warn_extreme_ranges",
]

CALIBRATED_FLAG = "qat_calibrated"
"""Name of the bool buffer on a prepared model that records that calibration ran (survives checkpoints)."""


class UncalibratedModelError(RuntimeError):
    """QAT or analysis was asked to run on a prepared model whose quant nodes never saw calibration data."""


class CalibrationError(RuntimeError):
    """A calibration batch failed to load or to run; the model was restored, the cause is chained."""


# ----------------------------------------------------------------------------------------------- the flag
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


def _network(model: nn.Module) -> nn.Module:
    """Return the network inside a ``torch.compile`` wrapper (its attributes are read through, not set)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def ensure_calibrated_flag(model: nn.Module) -> torch.Tensor:
    """Register the ``qat_calibrated`` buffer on a prepared model (idempotent) and return it.

    A load-state-dict pre-hook fills the flag in for checkpoints that predate it, so strict loading works.
    A ``torch.compile`` wrapper's flag is its network's.
    """
    model = _network(model)
    flag = getattr(model, CALIBRATED_FLAG, None)
    if isinstance(flag, torch.Tensor):
        return flag
    device = next((b.device for b in model.buffers()), torch.device("cpu"))
    model.register_buffer(CALIBRATED_FLAG, torch.tensor(False, device=device))
    model.register_load_state_dict_pre_hook(_fill_missing_flag)
    return getattr(model, CALIBRATED_FLAG)


def is_calibrated(model: nn.Module) -> bool:
    """Value of the ``qat_calibrated`` buffer (False when absent)."""
    flag = getattr(_network(model), CALIBRATED_FLAG, None)
    return bool(flag) if isinstance(flag, torch.Tensor) else False


def _needs_data(node: FakeQuantize) -> bool:
    """Say whether ``node`` is an integer node whose scale comes from observed data (not fixed, no cast)."""
    if not node.dtype.is_integer or getattr(node, "observer_name", None) == "fixed":
        return False
    return bool(getattr(node.observer, "needs_data", True))


def uncalibrated_nodes(model: nn.Module) -> list[str]:
    """Names of the integer quant nodes that never saw data (no ready scale, no statistics)."""
    if is_calibrated(model):
        return []
    return [
        name
        for name, node in iter_fake_quantize(model)
        if _needs_data(node) and not bool(node.scale_ready) and not node.observer.has_data
    ]


def require_calibrated(model: nn.Module, who: str, strict: bool = True) -> list[str]:
    """Refuse a model whose quant nodes were never calibrated, with one clear error (not one per node).

    A model counts as calibrated when its ``qat_calibrated`` flag is set (by :func:`calibrate` or the
    ``Calibration`` callback) or when any integer node that needs data has seen some (calibrated by hand,
    or loaded from a checkpoint; nodes of branches the calibration data never reach are not held against
    it).

    Args:
        model: a prepared network.
        who: what is about to run (named in the message), e.g. ``"QuantizationAwareTraining"``.
        strict: raise; ``False`` warns once instead (the nodes then start from the observer's default
            scale, or from the first QAT batch).

    Returns:
        The names of the uncalibrated nodes (empty when the model counts as calibrated).

    Raises:
        UncalibratedModelError: when ``strict`` and some nodes have no calibrated scale.
    """
    missing = uncalibrated_nodes(model)
    total = sum(1 for _, node in iter_fake_quantize(model) if _needs_data(node))
    if len(missing) < total or not missing:  # nodes that calibration never reached (unused branches) pass
        return []
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    message = (
        f"{who}: the model is not calibrated: {len(missing)} of {total} quant node(s) never saw calibration "
        f"data ({shown}). Calibrate first (the Calibration callback before it, or "
        "qat_lightning.calibrate(model, loader)), or pass strict=False to start from uncalibrated scales"
    )
    if strict:
        raise UncalibratedModelError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return missing


# ----------------------------------------------------------------------------------------------- modes
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


# ----------------------------------------------------------------------------------------------- calibrate
_NODE_MIRRORS = ("_dirty", "_scale_known", "_warn_default", "_batches_before")
"""A node's python mirrors of its buffers that a calibration forward or a state change moves."""

_ABSENT = object()


@contextmanager
def restored_on_error(nodes: list[FakeQuantize]) -> Iterator[None]:
    """Put every node's buffers, parameters and python mirrors back as they were when the body raises.

    The snapshot holds the quant nodes' own tensors only (observer statistics, scales, flags): no model
    weights. BatchNorm statistics need none: calibration runs in eval mode, which never moves them.
    """
    saved = [
        (
            node,
            {k: v.detach().clone() for k, v in (*node.named_buffers(), *node.named_parameters())},
            {k: node.__dict__.get(k, _ABSENT) for k in _NODE_MIRRORS},
        )
        for node in nodes
    ]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for node, tensors, mirrors in saved:
                current = dict((*node.named_buffers(), *node.named_parameters()))
                for key, value in tensors.items():
                    current[key].copy_(value)
                for key, value in mirrors.items():
                    if value is _ABSENT:
                        node.__dict__.pop(key, None)
                    else:
                        node.__dict__[key] = value
        raise


def _planned(batches: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        return len(batches) if num_batches is None else num_batches  # type: ignore[arg-type]
    except TypeError:
        return None


def _feed(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None,
    fn: InputFn,
    transfer: Callable[[Any], Any] | None,
    progress: bool,
) -> int:
    """Run the batches through ``model``; return how many ran.

    Raises:
        CalibrationError: naming the (0-based) batch that failed to load or to run; the cause is chained.
    """
    seen = 0
    planned = _planned(batches, num_batches)
    try:
        for batch in tqdm(
            islice(batches, num_batches), total=planned, desc="Calibration", disable=not progress
        ):
            if transfer is not None:
                batch = transfer(batch)
            call_model(model, normalize_inputs(fn(batch)))
            seen += 1
    except Exception as error:
        raise CalibrationError(
            f"calibration failed at batch {seen} (0-based; {seen} batch(es) ran before it): "
            f"{type(error).__name__}: {error}. The quant nodes' statistics, scales and states were restored "
            "to what they were before calibrate()"
        ) from error
    return seen


def _check_finite(nodes: list[FakeQuantize]) -> None:
    """Raise when an observer that does not ignore NaN/inf saw some (its message names the node)."""
    for node in nodes:
        try:
            node.observer.check_finite()
        except ValueError as error:
            raise ValueError(
                f"{error}. The quant nodes' statistics, scales and states were restored to what they were "
                "before calibrate()"
            ) from error


def _check_arguments(model: nn.Module, batches: Iterable[Any], num_batches: int | None) -> list[FakeQuantize]:
    """Validate calibrate's arguments before anything runs; return the model's quant nodes."""
    require_module(model, "calibrate", "model")
    require_count("num_batches", num_batches, "calibrate", allow_none=True)
    if not isinstance(batches, Iterable):
        raise TypeError(
            "calibrate: batches must be an iterable of batches (a DataLoader, a list), "
            f"got {type(batches).__name__}"
        )
    nodes = [node for _, node in iter_fake_quantize(model)]
    if not nodes:
        raise ValueError(
            f"calibrate: {type(_network(model)).__name__} has no quant node (FakeQuantize) to calibrate; "
            "prepare it first: qat_model = qat_lightning.prepare(model, example_inputs=...)"
        )
    return nodes


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    transfer: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> int:
    """Run ``model`` forward-only in CALIBRATION state (eval mode, no grad), then leave it in VALIDATION.

    Sets the model's ``qat_calibrated`` flag. The training flags of every submodule are restored afterwards.
    On an error (a batch that fails to load or to run, NaN/inf data, an empty loader) every quant node's
    statistics, scale, flags and state are put back as they were and the calibrated flag stays as it was:
    the model is bit-identical to before the call.

    Args:
        model: a prepared network.
        batches: any iterable of batches.
        num_batches: how many batches to use (``None``: all).
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).
        transfer: prepares a batch for the model (device, dtype), e.g. a trainer's batch transfer.
        progress: show a progress bar.

    Returns:
        The number of batches actually used.

    Raises:
        TypeError: ``model`` is not a module, ``batches`` not iterable, ``num_batches`` not an int.
        ValueError: for a non-positive ``num_batches``, a model without quant nodes (not prepared), NaN/inf
            seen by an observer that does not ignore them, or when ``batches`` yields no batch (an
            uncalibrated model is never marked calibrated).
        CalibrationError: a batch failed to load or to run (the message names it; the cause is chained).
    """
    nodes = _check_arguments(model, batches, num_batches)
    fn = input_fn or default_input_fn
    with preserved_modes(model), restored_on_error(nodes):
        model.eval()
        set_fake_quantize(model, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            seen = _feed(model, batches, num_batches, fn, transfer, progress)
        if seen == 0:
            raise ValueError(
                "calibration got no batch: the calibration loader is empty (check the dataset, the sampler "
                "and drop_last); the model was not marked calibrated"
            )
        _check_finite(nodes)
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    ensure_calibrated_flag(model).fill_(True)
    warn_extreme_ranges(model)
    return seen


EXTREME_RANGE = 1e30
"""A calibrated integer range (``scale * qmax``) at or above this is a mask or an infinite constant."""


def warn_extreme_ranges(model: nn.Module) -> list[str]:
    """Warn about integer nodes whose calibrated range reaches :data:`EXTREME_RANGE` (one host sync).

    Such a node quantizes an attention mask (``finfo.min`` / ``-inf`` entries) or another huge constant:
    every ordinary value rounds to 0. prepare leaves the mask-like values it recognises float32; this
    catches the others.

    Returns:
        The names of those nodes.
    """
    nodes = [(name, node) for name, node in iter_fake_quantize(model) if node.dtype.is_integer]
    if not nodes:
        return []
    ranges = torch.stack([node.scale.detach().float().amax() * node.dtype.qmax for _, node in nodes])
    extreme = ranges.ge(EXTREME_RANGE).cpu().tolist()
    names = [name for (name, _), bad in zip(nodes, extreme, strict=True) if bad]
    if names:
        warnings.warn(
            f"calibrated range of {len(names)} quant node(s) is >= {EXTREME_RANGE:g} ({', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}): they quantize an attention mask or an infinite constant, "
            "which rounds every ordinary value to 0. Keep that value float32 (pass the mask as an integer "
            "or bool input, or give the op a float32 qconfig).",
            RuntimeWarning,
            stacklevel=2,
        )
    return names


def reduce_observer_statistics(model: nn.Module, group: Any = None) -> int:
    """All-reduce every observer's statistics across ranks and recompute the scales (no-op without DDP).

    Returns:
        The number of quant nodes reduced (0 when ``torch.distributed`` is not initialized).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    nodes = [node for _, node in iter_fake_quantize(model)]
    for node in nodes:  # same module order on every rank -> collectives match
        node.observer.reduce_statistics(group)
    for node in nodes:
        if node.calibrates:  # a pinned scale stays as it is
            node.refresh_scale()
    return len(nodes)
