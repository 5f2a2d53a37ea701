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
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

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
    "DataDrift",
    "DataDriftMeter",
    "UncalibratedModelError",
    "calibrate",
    "ensure_calibrated_flag",
    "is_calibrated",
    "preserved_modes",
    "reduce_observer_statistics",
    "require_calibrated",
    "uncalibrated_nodes",
]

CALIBRATED_FLAG = "qat_calibrated"
"""Name of the bool buffer on a prepared model that records that calibration ran (survives checkpoints)."""


class UncalibratedModelError(RuntimeError):
    """QAT or analysis was asked to run on a prepared model whose quant nodes never saw calibration data."""


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
def _planned(batches: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        return len(batches) if num_batches is None else num_batches  # type: ignore[arg-type]
    except TypeError:
        return None


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    transfer: Callable[[Any], Any] | None = None,
    progress: bool = False,
) -> int:
    """Run ``model`` forward-only in CALIBRATION state (eval mode, no grad), then leave it in VALIDATION.

    Sets the model's ``qat_calibrated`` flag. The training flags of every submodule are restored afterwards;
    on an error (an empty loader included) the quant states are too and the flag stays as it was.

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
        ValueError: for a non-positive ``num_batches`` or when ``batches`` yields no batch (an uncalibrated
            model is never marked calibrated).
    """
    if num_batches is not None and (isinstance(num_batches, bool) or int(num_batches) < 1):
        raise ValueError(f"num_batches must be a positive int or None (all batches), got {num_batches!r}")
    fn = input_fn or default_input_fn
    seen = 0
    with preserved_modes(model):
        model.eval()
        set_fake_quantize(model, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            planned = _planned(batches, num_batches)
            for batch in tqdm(
                islice(batches, num_batches), total=planned, desc="Calibration", disable=not progress
            ):
                if transfer is not None:
                    batch = transfer(batch)
                call_model(model, normalize_inputs(fn(batch)))
                seen += 1
        if seen == 0:
            raise ValueError(
                "calibration got no batch: the calibration loader is empty (check the dataset, the sampler "
                "and drop_last); the model was not marked calibrated"
            )
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    ensure_calibrated_flag(model).fill_(True)
    return seen


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


# ----------------------------------------------------------------------------------------------- drift
BN_SHIFT_LIMIT = 1.0
"""Drift limit, in running standard deviations: a BatchNorm channel whose inputs, averaged over every
sample the meter saw, lie further than this from the running mean means the data differ from those the
statistics were estimated on. The average's own sampling noise is about ``1 / sqrt(samples)`` of this unit,
so small batches do not raise it; only a real shift of the input distribution does."""


@dataclass(frozen=True)
class DataDrift:
    """How far the batches fed to a model lie from its calibrated statistics (measured, nothing changed).

    Attributes:
        batches: how many batches were measured.
        bn_shift: the largest ``|mean of the inputs - running_mean| / running std`` over BatchNorm channels,
            the mean taken per channel over every sample (and spatial position) of the measured batches,
            not per batch: its sampling noise is about ``1 / sqrt(bn_samples)``, not ``1 / sqrt(batch)``.
        bn_name: the BatchNorm where it occurred (empty when no BatchNorm ran in train mode).
        range_ratio: the largest ``max |x| / (scale * qmax)`` over integer activation nodes (> 1: the batch
            saturates the calibrated range).
        range_name: the node where it occurred.
        bn_samples: how many values per channel that mean was taken over at ``bn_name``.
    """

    batches: int
    bn_shift: float
    bn_name: str
    range_ratio: float
    range_name: str
    bn_samples: int = 0

    @property
    def bn_mismatch(self) -> bool:
        """Whether the BatchNorm inputs are off by more than :data:`BN_SHIFT_LIMIT` running std."""
        return self.bn_shift > BN_SHIFT_LIMIT

    def render(self) -> str:
        """One line per measure."""
        bn = "n/a (no BatchNorm)"
        if self.bn_name:
            bn = f"{self.bn_shift:.3g} running std at {self.bn_name} (mean over {self.bn_samples} values)"
        rng = (
            f"{self.range_ratio:.3g}x the calibrated range at {self.range_name}" if self.range_name else "n/a"
        )
        return (
            f"data drift over {self.batches} training batch(es): BatchNorm input mean shift {bn} "
            f"(limit {BN_SHIFT_LIMIT:g}); largest activation {rng}"
        )


class DataDriftMeter:
    """Measure, with forward pre-hooks, how far the fed batches lie from the calibrated statistics.

    It never changes the model: BatchNorm inputs are compared with the running statistics (only BatchNorms
    that run their own forward, i.e. in train mode or unfused), integer activation inputs with the
    calibrated range. The BatchNorm inputs are summed per channel on their device (no host sync per batch)
    and compared as one mean over all measured samples when :meth:`close` is called, so the measure's noise
    shrinks with the number of samples. Counts only while :attr:`active` is true; :meth:`close` removes the
    hooks. Under ``torch.distributed`` :meth:`close` reduces the ranks' measures first (every rank calls it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self.batches = 0
        self._worst: dict[str, Tensor] = {}
        self._bn: dict[str, tuple[nn.Module, Tensor, int]] = {}
        bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._bns = [(n, m) for n, m in bns if m.running_mean is not None]  # registration order: collectives
        nodes = [(n, q) for n, q in iter_fake_quantize(model) if q.ch_axis is None and q.dtype.is_integer]
        self._device = next((b.device for b in model.buffers()), torch.device("cpu"))
        self._handles = [m.register_forward_pre_hook(self._bn_hook(n)) for n, m in self._bns]
        self._handles += [q.register_forward_pre_hook(self._range_hook(n)) for n, q in nodes]
        self._nodes = [n for n, _ in nodes]

    def _bn_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active or not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
                return
            x = args[0].detach()
            total = x.sum(dim=[d for d in range(x.dim()) if d != 1], dtype=torch.float32)
            count = x.numel() // max(x.shape[1], 1)
            seen = self._bn.get(name)
            if seen is not None:
                total, count = seen[1] + total, seen[2] + count
            self._bn[name] = (module, total, count)

        return hook

    def _range_hook(self, name: str) -> Callable[..., None]:
        def hook(node: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.active or not args or not isinstance(args[0], Tensor) or args[0].numel() == 0:
                return
            limit = node.scale.float().max() * node.dtype.qmax
            value, seen = args[0].detach().abs().max().float() / limit, self._worst.get(name)
            self._worst[name] = value if seen is None else torch.maximum(seen, value)

        return hook

    def _bn_shifts(self) -> dict[str, Tensor]:
        """Per BatchNorm: the largest channel shift of the all-sample mean, in running std (on the host)."""
        shifts = {}
        for name, (module, total, count) in self._bn.items():
            if count:
                mean, var = module.running_mean.detach().cpu().double(), module.running_var.detach().cpu()
                std = (var.double() + module.eps).sqrt()
                shifts[name] = ((total.cpu().double() / count - mean).abs() / std).max()
        return shifts

    def reduce(self, group: Any = None) -> bool:
        """All-reduce the ranks' totals, counts, batches (sum), ratios (max); every rank, once (DDP only)."""
        if not (dist.is_available() and dist.is_initialized()):
            return False
        dev, f64, none = self._device, torch.float64, torch.tensor(-1.0)  # -1: a node no rank saw
        seen = [self._bn.get(n, (m, torch.zeros_like(m.running_mean), 0)) for n, m in self._bns]  # 0: unseen
        counts = torch.tensor([c for *_, c in seen] + [self.batches], dtype=f64)
        sums = torch.cat([t.to(dev, f64).reshape(-1) for _, t, _ in seen] + [counts.to(dev)])
        ratios = [self._worst.get(n, none).cpu().float().reshape(()) for n in self._nodes]
        worst = torch.stack([*ratios, none]).to(dev)
        dist.all_reduce(sums, dist.ReduceOp.SUM, group=group)
        dist.all_reduce(worst, dist.ReduceOp.MAX, group=group)
        *totals, counts = sums.split([t.numel() for _, t, _ in seen] + [len(seen) + 1])
        *per_bn, self.batches = counts.long().tolist()
        self._bn = {n: (m, t, c) for (n, m), t, c in zip(self._bns, totals, per_bn, strict=True) if c}
        self._worst = {n: w for n, w in zip(self._nodes, worst, strict=False) if w >= 0}
        return True

    def close(self, reduce: bool = True) -> DataDrift:
        """Remove the hooks; return what was measured, first :meth:`reduce`-d across ranks if ``reduce``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if reduce:
            self.reduce()
        bn, rng = _worst_of(self._bn_shifts()), _worst_of(self._worst)
        samples = self._bn[bn[0]][2] if bn[0] else 0
        return DataDrift(self.batches, bn[1], bn[0], rng[1], rng[0], samples)


def _worst_of(values: dict[str, Tensor]) -> tuple[str, float]:
    if not values:
        return "", 0.0
    name = max(values, key=lambda k: float(values[k]))
    return name, float(values[name])
