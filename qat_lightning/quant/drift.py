"""Data drift during a sanity run: what held BatchNorm statistics and calibrated ranges would have learnt.

:class:`DataDriftMeter` hooks a model's BatchNorms and integer activation nodes while a check trains with
them held (``SanityCheck(mode="lr0")``) and reports, as a :class:`DataDrift`, how far the training data lie
from the calibrated statistics; under ``torch.distributed`` the ranks' measures are reduced first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize

__all__ = ["BN_SHIFT_LIMIT", "DataDrift", "DataDriftMeter"]

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
