"""Shared-module advice (the seed's "Shared Modules" A/B/C), from per-call-site statistics.

A float module called more than once becomes one op per call site (``conv``, ``conv#1``, ... sharing
``OpInfo.module_path``). For each such module the call sites' output distributions are compared:

* **case C** (copy the module per call site): the widest site's ``max|x|`` is at least ``range_ratio`` x
  the narrowest's (default 4: one shared int8 grid would cost the narrow site ``log2(ratio)`` = 2 bits), or
  the means of two sites differ by at least ``mean_shift`` x the larger standard deviation (default 1.0;
  moments pooled over all output elements; needs ``inputs``: the observers keep no mean);
* **case B** (nothing to do): neither.

Statistics come from a float forward over ``inputs`` (fake quant off, inside
:func:`qat_lightning.ptq.float_reference`: after AdaRound / bias correction the original float model;
min, max, mean, std per site) or, without inputs, from each site's output observer (min / max seen in
calibration).

Plain torch: no lightning, no hydra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qat_lightning.analysis.inputs import call_model, normalize_inputs
from qat_lightning.analysis.state import eval_mode
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, fake_quant_disabled
from qat_lightning.quant.ops import OpInfo, iter_quant_ops

__all__ = [
    "CallSiteStats",
    "SharedModuleAdvice",
    "SharedModuleFinding",
    "render_shared_module_advice",
    "shared_module_advice",
]


@dataclass(frozen=True)
class CallSiteStats:
    """Output statistics of one call site.

    Attributes:
        op_name: the call site's op (``conv``, ``conv#1``, ...).
        call_index: 0 for the first call.
        min: smallest output value.
        max: largest output value.
        mean: mean output (``nan`` from observers).
        std: standard deviation (``nan`` from observers).
    """

    op_name: str
    call_index: int
    min: float
    max: float
    mean: float = math.nan
    std: float = math.nan

    @property
    def abs_max(self) -> float:
        """``max(|min|, |max|)``."""
        return max(abs(self.min), abs(self.max))


@dataclass(frozen=True)
class SharedModuleFinding:
    """The verdict for one module called more than once.

    Attributes:
        module_path: the float module.
        case: ``B`` (similar distributions) or ``C`` (different: copy the module).
        sites: one entry per call site, in call order.
        range_ratio: widest / narrowest ``max|x|`` over the sites.
        mean_shift: largest ``|mean_i - mean_j| / max(std_i, std_j)`` (``nan`` without moments).
        reason: the numbers that decided, in words.
    """

    module_path: str
    case: str
    sites: tuple[CallSiteStats, ...]
    range_ratio: float
    mean_shift: float
    reason: str

    @property
    def advice(self) -> str:
        """What to do, in words."""
        if self.case == "B":
            return "case B: call sites have similar distributions; no change needed"
        bits = math.log2(self.range_ratio) if self.range_ratio > 1 and math.isfinite(self.range_ratio) else 0
        return (
            f"case C: copy the module per call site (e.g. `self.{self.module_path.split('.')[-1]}_1 = "
            f"copy.deepcopy(self.{self.module_path.split('.')[-1]})` and call the copy at the 2nd site); "
            f"one shared quantization grid would cost the narrowest site {bits:.1f} bit(s)"
        )


@dataclass(frozen=True)
class SharedModuleAdvice:
    """Every shared module's verdict.

    Attributes:
        findings: one per module called more than once, case C first.
        range_threshold: the ``range_ratio`` of case C.
        mean_threshold: the ``mean_shift`` of case C.
        source: ``forward`` (float forward over inputs) or ``observer`` (calibration min/max).
    """

    findings: tuple[SharedModuleFinding, ...]
    range_threshold: float
    mean_threshold: float
    source: str

    @property
    def case_c(self) -> tuple[SharedModuleFinding, ...]:
        """The modules to copy."""
        return tuple(f for f in self.findings if f.case == "C")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _forward_stats(model: nn.Module, ops: dict[str, nn.Module], batches: Iterable[Any]) -> dict[str, list]:
    acc: dict[str, list] = {name: [math.inf, -math.inf, 0.0, 0.0, 0] for name in ops}

    def hook(name: str):
        def fn(_m: nn.Module, _a: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is None or not t.is_floating_point():
                return
            t = t.detach().double()
            a = acc[name]
            a[0], a[1] = min(a[0], float(t.min())), max(a[1], float(t.max()))
            a[2] += float(t.sum())
            a[3] += float((t * t).sum())
            a[4] += t.numel()

        return fn

    handles = [op.register_forward_hook(hook(name)) for name, op in ops.items()]
    try:
        with torch.no_grad(), eval_mode(model), float_reference(model), fake_quant_disabled(model):
            for batch in batches:
                call_model(model, normalize_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return acc


def _observer_stats(op: nn.Module) -> tuple[float, float]:
    node = getattr(op, "output_quant", None)
    if not isinstance(node, FakeQuantize):
        return math.nan, math.nan
    return float(node.observer.min_val.min()), float(node.observer.max_val.max())


def shared_module_advice(
    model: nn.Module,
    inputs: Any = None,
    range_ratio: float = 4.0,
    mean_shift: float = 1.0,
) -> SharedModuleAdvice:
    """Tell, for each module called more than once, whether its call sites really differ (C) or not (B).

    Args:
        model: a prepared model (calibrated, when ``inputs`` is ``None``).
        inputs: model inputs (a tensor, tuple of args, dict of kwargs) or a list of them; ``None`` uses the
            output observers' calibration min / max.
        range_ratio: case C when the widest site's ``max|x|`` is at least this many times the narrowest's.
        mean_shift: case C when two sites' means differ by at least this many (larger) standard deviations.

    Returns:
        The typed advice (render with :func:`render_shared_module_advice`).

    Raises:
        ValueError: for ``range_ratio < 1`` or ``mean_shift <= 0``.
    """
    if not range_ratio >= 1.0:
        raise ValueError(f"range_ratio must be >= 1, got {range_ratio}")
    if not mean_shift > 0:
        raise ValueError(f"mean_shift must be > 0, got {mean_shift}")
    groups: dict[str, list[tuple[str, OpInfo, nn.Module]]] = {}
    for name, op in iter_quant_ops(model):
        info = op.op_info
        groups.setdefault(info.module_path, []).append((name, info, op))
    shared = {path: sites for path, sites in groups.items() if len({i.call_index for _, i, _ in sites}) > 1}
    ops = {name: op for sites in shared.values() for name, _, op in sites}
    raw: dict[str, list] | None = None
    if inputs is not None and ops:
        batches = inputs if isinstance(inputs, list) else [inputs]
        raw = _forward_stats(model, ops, batches)
    findings = []
    for path, sites in shared.items():
        stats = []
        for name, info, op in sorted(sites, key=lambda s: s[1].call_index):
            if raw is not None and raw[name][4] > 0:
                lo, hi, s1, s2, n = raw[name]
                mean = s1 / n
                stats.append(
                    CallSiteStats(name, info.call_index, lo, hi, mean, math.sqrt(max(s2 / n - mean**2, 0)))
                )
            else:
                lo, hi = _observer_stats(op)
                stats.append(CallSiteStats(name, info.call_index, lo, hi))
        findings.append(_verdict(path, tuple(stats), range_ratio, mean_shift))
    findings.sort(key=lambda f: (f.case != "C", -_finite(f.range_ratio)))
    return SharedModuleAdvice(
        tuple(findings), range_ratio, mean_shift, "forward" if raw is not None else "observer"
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1e30


def _verdict(
    path: str, stats: tuple[CallSiteStats, ...], range_threshold: float, mean_threshold: float
) -> SharedModuleFinding:
    amax = [s.abs_max for s in stats if math.isfinite(s.abs_max)]
    ratio = math.nan
    if amax:
        ratio = max(amax) / min(amax) if min(amax) > 0 else (math.inf if max(amax) > 0 else 1.0)
    shift = math.nan
    for i, a in enumerate(stats):
        for b in stats[i + 1 :]:
            if math.isfinite(a.mean) and math.isfinite(b.mean):
                spread = max(a.std, b.std)
                d = abs(a.mean - b.mean) / spread if spread > 0 else (0.0 if a.mean == b.mean else math.inf)
                shift = d if math.isnan(shift) else max(shift, d)
    by_range = math.isfinite(ratio) and ratio >= range_threshold or ratio == math.inf
    by_mean = not math.isnan(shift) and shift >= mean_threshold
    case = "C" if by_range or by_mean else "B"
    reason = f"max|x| ratio {ratio:.3g} (C at >= {range_threshold:g})"
    if not math.isnan(shift):
        reason += f", mean shift {shift:.3g} std (C at >= {mean_threshold:g})"
    return SharedModuleFinding(path, case, stats, ratio, shift, reason)


def render_shared_module_advice(advice: SharedModuleAdvice) -> str:
    """Render the advice as text (the file ``shared_modules.txt``)."""
    lines = [
        f"Shared modules (per-call-site statistics from {advice.source}; the seed's cases B / C)",
        f"case C when max|x| ratio >= {advice.range_threshold:g} "
        f"or mean shift >= {advice.mean_threshold:g} std",
        "",
    ]
    if not advice.findings:
        lines.append("no module is called more than once")
    for f in advice.findings:
        lines.append(f"{f.module_path}: {f.reason}")
        for s in f.sites:
            moments = "" if math.isnan(s.mean) else f", mean {s.mean:.4g}, std {s.std:.4g}"
            lines.append(f"    {s.op_name} (call {s.call_index}): [{s.min:.4g}, {s.max:.4g}]{moments}")
        lines.append(f"    -> {f.advice}")
    return "\n".join(lines) + "\n"
