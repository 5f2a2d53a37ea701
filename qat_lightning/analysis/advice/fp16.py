"""fp16 diagnoses for j6p (the seed's "Non-gemm operators do not meet FP16 precision standards").

A float forward (fake quant off, inside :func:`qat_lightning.ptq.float_reference`: after AdaRound / bias
correction the original float model) over ``inputs`` records every quantized op's inputs and output; per op:

* **overflow**: an input or the output beyond the fp16 range (``|x| > 65504``) saturates in fp16;
* **intermediate overflow** of norm ops (LayerNorm, GroupNorm, ...): ``max(x^2)`` (their variance term)
  beyond the fp16 range. The seed: scale the input down first (a norm is scale invariant). Prepared
  LayerNorm / GroupNorm ops (``nn`` and ``F``) in fp16 configs do this automatically
  (:mod:`qat_lightning.quant.nodes.fp16_norm`): the finding reports whether the scaling is on for the op
  (``auto_scaling``), the factor it uses for this batch, and what to do when it is off or not available;
* **precision** of nonlinear ops (sigmoid, tanh, exp, softmax, log, silu, gelu): the op recomputed in fp16
  vs float; the 99th percentile of the elementwise relative error beyond ``precision_threshold`` (default
  1%): they cannot be rescaled, so the seed recommends fp32;
* **coordinates**: the grid input of ``grid_sample``: int16 with a fixed scale (the seed).

Each finding carries a ready template line. Plain torch: no lightning, no hydra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.analysis.inputs import call_model, normalize_inputs
from qat_lightning.analysis.state import eval_mode
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.quant.nodes.fake_quantize import fake_quant_disabled
from qat_lightning.quant.nodes.fp16_norm import norm_input_scale
from qat_lightning.quant.ops import iter_quant_ops

__all__ = ["FP16_MAX", "Fp16Diagnosis", "Fp16Finding", "diagnose_fp16", "render_fp16"]

FP16_MAX = 65504.0
"""Largest finite float16."""

_NONLINEAR: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "log": torch.log,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "silu": F.silu,
    "gelu": F.gelu,
}
_OVERFLOW = (
    "values beyond the fp16 range saturate: scale the input down before the op (and back after for linear "
    "ops such as mul), or keep the op in fp32"
)
_NORM_OVERFLOW = "max(x^2) of the variance term overflows fp16 without input scaling: "
_NORM_SCALED = (
    "automatic fp16 input scaling is on for this op (input x {k:.4g} = 2^{log2k:d} for this batch, "
    "eps x k^2; exact for a norm): the variance term stays in range, nothing to do"
)
_NORM_OFF = (
    "automatic fp16 input scaling is off for this op: turn it on with "
    "ql.set_fp16_norm_scaling(model, True, prefix={name!r}), or keep the op in fp32"
)
_NORM_MANUAL = (
    "automatic fp16 input scaling covers LayerNorm/GroupNorm ops only: multiply the input by a factor "
    "< {factor:.3g} before the op (a norm is scale invariant), or keep it in fp32"
)
_COORDINATE = (
    "coordinates pick the sampling points: int16 with a fixed scale (the seed), range from the grid's "
    "observed max|x| {grid:.4g}"
)
_FIXED_INT16 = "ModuleNameTemplate({{{target!r}: {{'dtype': ql.qint16, 'threshold': {threshold:.4g}}}}})"
_NORMS = ("layernorm", "layer_norm", "groupnorm", "group_norm", "instancenorm", "rmsnorm", "norm")


@dataclass(frozen=True)
class Fp16Finding:
    """One op whose fp16 execution is at risk.

    Attributes:
        op_name: the op.
        op_type: its type.
        kind: ``overflow``, ``intermediate_overflow``, ``precision`` or ``coordinate``.
        value: the measured number (``max|x|``, ``max(x^2)``, the relative error, the grid's ``max|x|``).
        threshold: what it was compared with.
        advice: what to do, in words.
        template: a ready template line (empty when nothing needs to be done).
        auto_scaling: for ``intermediate_overflow``: whether automatic fp16 input scaling is on for the op
            (``None``: the op has none).
    """

    op_name: str
    op_type: str
    kind: str
    value: float
    threshold: float
    advice: str
    template: str
    auto_scaling: bool | None = None


@dataclass(frozen=True)
class Fp16Diagnosis:
    """Every finding, in graph order.

    Attributes:
        findings: the findings.
        precision_threshold: the relative-error bar of ``precision`` findings.
    """

    findings: tuple[Fp16Finding, ...]
    precision_threshold: float


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _amax(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _rel_error_p99(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    ref = fn(x.double())
    half = fn(x.half().float()).half().double()  # fp16 input, fp16 output
    mask = ref.abs() > 0
    if not bool(mask.any()):
        return 0.0
    rel = ((half - ref).abs() / ref.abs())[mask].float()
    return float(torch.quantile(rel.flatten()[:1_000_000], 0.99))


def _norm_finding(name: str, op: nn.Module, x: torch.Tensor, template: str) -> Fp16Finding | None:
    """Return the ``intermediate_overflow`` finding of a norm op fed ``x`` (``None``: ``max(x^2)`` fits)."""
    amax = _amax(x)
    if amax**2 <= FP16_MAX:
        return None
    scaling = getattr(op, "fp16_input_scaling", None)
    if scaling is None:
        advice = _NORM_MANUAL.format(factor=math.sqrt(FP16_MAX) / amax)
    elif scaling:
        k = float(norm_input_scale(torch.tensor(amax)))
        advice = _NORM_SCALED.format(k=k, log2k=round(math.log2(k)))
        template = ""  # handled: no template to apply
    else:
        advice = _NORM_OFF.format(name=name)
    op_type = op.op_info.op_type
    return Fp16Finding(
        name, op_type, "intermediate_overflow", amax**2, FP16_MAX, _NORM_OVERFLOW + advice, template, scaling
    )


def _record(model: nn.Module, inputs: Any) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    seen: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    handles = []
    for name, op in iter_quant_ops(model):

        def hook(_m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            if name not in seen:
                seen[name] = (
                    [t.detach().float() for t in _tensors(args)],
                    [t.detach().float() for t in _tensors(out)],
                )

        handles.append(op.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model), float_reference(model), fake_quant_disabled(model):
            call_model(model, normalize_inputs(inputs))
    finally:
        for h in handles:
            h.remove()
    return seen


def diagnose_fp16(model: nn.Module, inputs: Any, precision_threshold: float = 1e-2) -> Fp16Diagnosis:
    """Flag fp16 overflow, norm intermediate overflow, nonlinear precision loss and coordinate inputs.

    Args:
        model: a prepared model (its ops are the ones diagnosed; fake quant is off during the forward).
        inputs: one batch of model inputs (a tensor, a tuple of args, a dict of kwargs).
        precision_threshold: 99th-percentile relative error of a nonlinear op in fp16 that is flagged.

    Returns:
        The typed diagnosis (render with :func:`render_fp16`).

    Raises:
        ValueError: for a non-positive threshold.
    """
    if not precision_threshold > 0:
        raise ValueError(f"precision_threshold must be > 0, got {precision_threshold}")
    seen = _record(model, inputs)
    findings: list[Fp16Finding] = []
    for name, op in iter_quant_ops(model):
        if name not in seen:
            continue
        ins, outs = seen[name]
        info = op.op_info
        kind = info.op_type.lower()
        fp32 = f"ModuleNameTemplate({{{name!r}: ql.float32}})"
        amax = max((_amax(t) for t in (*ins, *outs)), default=0.0)
        if amax > FP16_MAX:
            findings.append(
                Fp16Finding(
                    name,
                    info.op_type,
                    "overflow",
                    amax,
                    FP16_MAX,
                    _OVERFLOW,
                    fp32,
                )
            )
        norm = _norm_finding(name, op, ins[0], fp32) if ins and any(n in kind for n in _NORMS) else None
        if norm is not None:
            findings.append(norm)
        fn = _NONLINEAR.get(kind)
        if fn is not None and ins:
            err = _rel_error_p99(fn, ins[0])
            if err > precision_threshold:
                findings.append(
                    Fp16Finding(
                        name,
                        info.op_type,
                        "precision",
                        err,
                        precision_threshold,
                        "a nonlinear op cannot be rescaled around fp16: the seed recommends fp32",
                        fp32,
                    )
                )
        if "grid_sample" in kind and len(ins) > 1:
            grid = _amax(ins[1])
            producers = info.input_producers
            source = producers[1] if len(producers) > 1 and producers[1] else None
            target = source or f"<op producing input 1 of {name}>"
            findings.append(
                Fp16Finding(
                    name,
                    info.op_type,
                    "coordinate",
                    grid,
                    0.0,
                    _COORDINATE.format(grid=grid),
                    _FIXED_INT16.format(target=target, threshold=max(grid, 1e-6)),
                )
            )
    return Fp16Diagnosis(tuple(findings), precision_threshold)


def render_fp16(diagnosis: Fp16Diagnosis) -> str:
    """Render as text (``fp16_diagnosis.txt``)."""
    lines = [
        f"fp16 diagnosis (fp16 max {FP16_MAX:g}; "
        f"nonlinear rel. error p99 > {diagnosis.precision_threshold:g})",
        "",
    ]
    if not diagnosis.findings:
        lines.append("no op overflows fp16 or loses precision in fp16: nothing to report")
    for f in diagnosis.findings:
        lines.append(f"{f.op_name} ({f.op_type}) [{f.kind}]: {f.value:.4g} (threshold {f.threshold:g})")
        lines.append(f"    -> {f.advice}")
        if f.template:
            lines.append(f"    template: {f.template}")
    return "\n".join(lines) + "\n"
