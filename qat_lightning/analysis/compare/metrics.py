"""Error metrics between a float (base) tensor and a quantized (analy) tensor, computed in float64.

Built-in metrics (names are case-insensitive), each over the flattened values of one sample:

======== ============================================================ ===============
name     definition                                                   better
======== ============================================================ ===============
COSINE   ``<a, b> / (|a| |b|)``; 1 when both are all zero, 0 when one  higher
L1       ``mean |a - b|``                                             lower
ATOL     ``max |a - b|``                                              lower
MSE      ``mean (a - b)^2``                                           lower
SQNR     ``10 log10(sum a^2 / sum (a - b)^2)`` dB; +inf without noise  higher
KL       ``KL(softmax(a) || softmax(b))`` over the sample's values     lower
======== ============================================================ ===============

A *sample* is one slice along dim 0 (the batch dimension); a 0-d tensor is one sample. Custom metrics
are callables ``fn(base, analy) -> float`` (called per sample with a batch dimension of 1); wrap one in
:class:`Metric` to say that higher is better. :func:`badness` orders values so that larger = worse, with
NaN the worst of all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BUILTIN_METRICS",
    "Metric",
    "MetricLike",
    "resolve_metric",
    "resolve_metrics",
    "per_sample",
    "whole",
    "badness",
    "error_value",
    "error_name",
]

BatchedFn = Callable[[Tensor, Tensor], Tensor]


def _rows(x: Tensor) -> Tensor:
    x = x.detach().to(torch.float64)
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    dot = (a * b).sum(1)
    na = a.square().sum(1).sqrt()
    nb = b.square().sum(1).sqrt()
    out = dot / (na * nb)
    both_zero = (na == 0) & (nb == 0)
    one_zero = (na == 0) ^ (nb == 0)
    out = torch.where(both_zero, torch.ones_like(out), out)
    return torch.where(one_zero, torch.zeros_like(out), out)


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().mean(1)


def _atol(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().amax(1)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().mean(1)


def _sqnr(a: Tensor, b: Tensor) -> Tensor:
    signal = a.square().sum(1)
    noise = (a - b).square().sum(1)
    return sqnr_db(signal, noise)


def sqnr_db(signal: Tensor, noise: Tensor) -> Tensor:
    """``10 log10(signal / noise)`` with +inf for zero noise and -inf for zero signal with noise."""
    out = 10.0 * torch.log10(signal / noise)
    out = torch.where(noise == 0, torch.full_like(out, math.inf), out)
    return torch.where((signal == 0) & (noise > 0), torch.full_like(out, -math.inf), out)


def _kl(a: Tensor, b: Tensor) -> Tensor:
    logp = torch.log_softmax(a, dim=1)
    logq = torch.log_softmax(b, dim=1)
    return (logp.exp() * (logp - logq)).sum(1)


BUILTIN_METRICS: dict[str, tuple[BatchedFn, bool]] = {
    "COSINE": (_cosine, True),
    "L1": (_l1, False),
    "ATOL": (_atol, False),
    "MSE": (_mse, False),
    "SQNR": (_sqnr, True),
    "KL": (_kl, False),
}


@dataclass(frozen=True)
class Metric:
    """A named error metric.

    Attributes:
        name: column name in reports.
        fn: ``fn(base, analy) -> float`` for one sample (custom metrics), or ``None`` for a built-in.
        higher_is_better: True for similarity metrics (COSINE, SQNR).
    """

    name: str
    fn: Callable[[Tensor, Tensor], float | Tensor] | None = None
    higher_is_better: bool = False

    @property
    def builtin(self) -> bool:
        """Whether this is one of :data:`BUILTIN_METRICS`."""
        return self.fn is None


MetricLike = str | Metric | Callable[[Tensor, Tensor], float | Tensor]


def resolve_metric(metric: MetricLike) -> Metric:
    """Return a :class:`Metric` from a built-in name, a ``Metric`` or a plain callable (lower = better).

    Raises:
        ValueError: for an unknown name (the message lists the built-in names).
    """
    if isinstance(metric, Metric):
        if metric.fn is None and metric.name.upper() not in BUILTIN_METRICS:
            raise ValueError(f"unknown metric {metric.name!r}; allowed: {', '.join(BUILTIN_METRICS)}")
        return metric
    if isinstance(metric, str):
        key = metric.strip().upper()
        if key not in BUILTIN_METRICS:
            raise ValueError(
                f"unknown metric {metric!r}; allowed: {', '.join(BUILTIN_METRICS)} "
                "or a callable fn(base, analy)"
            )
        return Metric(key, None, BUILTIN_METRICS[key][1])
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, False)
    raise ValueError(f"a metric must be a name ({', '.join(BUILTIN_METRICS)}) or a callable, got {metric!r}")


def resolve_metrics(metrics: MetricLike | Sequence[MetricLike]) -> tuple[Metric, ...]:
    """Resolve one metric or a sequence of them; names must be unique."""
    items = [metrics] if isinstance(metrics, (str, Metric)) or callable(metrics) else list(metrics)
    if not items:
        raise ValueError("at least one metric is needed")
    resolved = tuple(resolve_metric(m) for m in items)
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"metric names must be unique, got {names}")
    return resolved


def per_sample(metric: Metric, base: Tensor, analy: Tensor) -> Tensor:
    """Compute the metric of every sample (dim 0 slice): a float64 tensor of shape ``(batch,)``.

    Raises:
        ValueError: when the shapes differ.
    """
    if base.shape != analy.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(base.shape)} and {tuple(analy.shape)}")
    if metric.fn is None:
        return BUILTIN_METRICS[metric.name.upper()][0](_rows(base), _rows(analy))
    if base.dim() == 0:
        return torch.tensor([float(metric.fn(base, analy))], dtype=torch.float64)
    values = [float(metric.fn(base[i : i + 1], analy[i : i + 1])) for i in range(base.shape[0])]
    return torch.tensor(values, dtype=torch.float64)


def whole(metric: Metric, base: Tensor, analy: Tensor) -> float:
    """Compute the metric over the whole tensors (samples flattened together; KL: mean over samples)."""
    if base.shape != analy.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(base.shape)} and {tuple(analy.shape)}")
    if metric.fn is not None:
        return float(metric.fn(base, analy))
    if metric.name.upper() == "KL":
        return float(per_sample(metric, base, analy).mean())
    a = base.detach().to(torch.float64).reshape(1, -1)
    b = analy.detach().to(torch.float64).reshape(1, -1)
    return float(BUILTIN_METRICS[metric.name.upper()][0](a, b)[0])


def badness(metric: Metric, value: float | Tensor) -> Tensor:
    """Values re-oriented so that larger = worse; NaN becomes +inf (the worst)."""
    v = torch.as_tensor(value, dtype=torch.float64)
    v = -v if metric.higher_is_better else v.clone()
    return torch.where(torch.isnan(v), torch.full_like(v, math.inf), v)


def error_value(metric: Metric, value: float) -> float:
    """Return the value stored in a sensitivity row (larger = worse): ``1 - cos``, ``-SQNR``, ..."""
    if not metric.higher_is_better:
        return value
    if metric.name.upper() == "COSINE":
        return 1.0 - value
    return -value


def error_name(metric: Metric) -> str:
    """Column name of :func:`error_value`: ``1-COSINE``, ``-SQNR``, or the metric's own name."""
    if not metric.higher_is_better:
        return metric.name
    if metric.name.upper() == "COSINE":
        return "1-COSINE"
    return f"-{metric.name}"
