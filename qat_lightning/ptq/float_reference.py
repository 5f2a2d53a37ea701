"""``float_reference(model)``: inside it, fake quant off runs the original float parameters again.

AdaRound writes its rounded weights into the float weights and bias correction shifts the biases; the
values they overwrote are recorded (:mod:`qat_lightning.ptq.float_record`). Inside ``float_reference`` every
conv / linear op with such a record decides at each call which value each recorded parameter takes:

* **weight**: the original float weight when the op's weight quant node does not quantize (``FLOAT``, the
  global switch off, a float dtype) or quantizes to another dtype than the one the weight was rounded for
  (a search raising it to int16 quantizes the float weight, not the int8-rounded one); otherwise the
  rounded weight, which the pinned weight scale reproduces exactly.
* **bias**: the original float bias when none of the op's quant nodes quantizes; otherwise the corrected
  one (the correction belongs to the op as quantized).

So the model in ``FLOAT`` is the float model again (before any post-training step), the model as
calibrated is unchanged, and a mixed state (exact sensitivity: one op quantized) quantizes that op only
(the approximate sensitivity runs all in FLOAT: its weight noise is the nearest rounding of the float
weight, not AdaRound's). The swap replaces the parameter object for the duration of the op's call (no
in-place write: autograd and version counters are untouched) and is undone when the call returns, also on
an exception. Parameters of an op in FLOAT get no gradient inside it (the originals are constants).

:class:`~qat_lightning.analysis.QuantAnalysis` (one model or two), ``bias_correction``, the app's
search and its float sanity check after calibration run inside it; use it around any code of your own that
takes "fake quant off" as the float model. A model whose weights lie on their pinned quantization grid with
no record (AdaRound's weights loaded from a bare ``state_dict``) cannot be given its float weights back:
entering warns, naming the ops.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat_lightning.ptq.float_record import live_record
from qat_lightning.ptq.gemm_view import GemmView, gemm_views
from qat_lightning.quant import FakeQuantState, GlobalFakeQuantSwitch, quant_nodes_of
from qat_lightning.quant.nodes.switches import FakeCastSwitch

__all__ = ["float_reference"]


@dataclass
class _Swap:
    """One recorded parameter of an op: the owner, the name, the real parameter and the original."""

    owner: nn.Module
    name: str
    real: Any
    original: nn.Parameter
    weight_dtype: str | None  # the rounded-for dtype of a weight; None for a bias


@dataclass
class _Plan:
    swaps: list[_Swap]
    saved: list[list[tuple[nn.Module, str, Any]]] = field(default_factory=list)


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()
"""The open plans by op (not on the op: a copy of the model made inside the context carries none)."""


def _quantizes(node: Any) -> bool:
    """Whether a quant node changes what passes through it now (the conditions of its forward)."""
    if node is None or node.state in (FakeQuantState.FLOAT, FakeQuantState.CALIBRATION):
        return False
    if not GlobalFakeQuantSwitch._enabled:
        return False
    dtype = node.dtype
    return dtype.is_integer or (dtype.is_float16 and FakeCastSwitch._enabled)


def _pre_hook(op: nn.Module, _args: Any) -> None:
    plan = _PLANS.get(op)
    if plan is None:
        return
    wq = getattr(op, "weight_quant", None)
    weight_on = _quantizes(wq)
    any_on = any(_quantizes(n) for n in quant_nodes_of(op).values())
    saved = []
    for s in plan.swaps:
        if s.weight_dtype is not None:
            use_original = not weight_on or wq.dtype.name != s.weight_dtype
        else:
            use_original = not any_on
        saved.append((s.owner, s.name, s.owner._parameters[s.name]))
        s.owner._parameters[s.name] = s.original if use_original else s.real
    plan.saved.append(saved)


def _post_hook(op: nn.Module, _args: Any, _out: Any) -> None:
    plan = _PLANS.get(op)
    if plan is None or not plan.saved:
        return
    for owner, name, value in reversed(plan.saved.pop()):
        owner._parameters[name] = value


def _swaps(view: GemmView) -> list[_Swap]:
    found = []
    owners = [(view.module, "weight"), (view.module, "bias")] + ([(view.bn, "bias")] if view.bn else [])
    for owner, name in owners:
        rec = live_record(owner, name)
        if rec is None:
            continue
        real = owner._parameters[name]
        original = nn.Parameter(rec.original.to(real.device, real.dtype), requires_grad=False)
        is_weight = owner is view.module and name == "weight"
        found.append(_Swap(owner, name, real, original, (rec.dtype or "?") if is_weight else None))
    return found


def _warn_unrecorded(views: list[GemmView]) -> None:
    """Warn about ops whose float weight lies on its pinned grid with no record of the original."""
    names = []
    for view in views:
        wq = view.weight_quant
        if not wq.is_fixed or not wq.dtype.is_integer or live_record(view.module, "weight") is not None:
            continue
        with torch.no_grad():
            w = view.weight()
            scale = wq.scale.detach().to(w).reshape((-1,) + (1,) * (w.dim() - 1))
            codes = w / scale
            if w.numel() and float((codes - codes.round()).abs().max()) < 1e-3:
                names.append(view.name)
    if names:
        warnings.warn(
            f"float_reference: the float weights of {', '.join(names)} lie on their pinned quantization grid "
            "(AdaRound wrote them) and no record of their original float values is attached, so with fake "
            "quant off these ops run the rounded weights, not the float model. Keep the record with the "
            "model (qat_lightning.ptq.float_record_state / load_float_record_state; the PTQ callbacks and "
            "the app save it in their checkpoints), re-run the post-training steps on the calibrated model, "
            "or compare against the float model: QuantAnalysis(float_model, calib_model).",
            stacklevel=3,
        )


@contextmanager
def float_reference(model: nn.Module) -> Iterator[nn.Module]:
    """Make every op of ``model`` whose quant nodes are off run its original float parameters (module doc).

    Re-entrant (an inner use inside an open one is a no-op); a model no post-training step changed runs as
    it is. Leaves the model exactly as it was on exit.
    """
    views = [v for v in gemm_views(model) if isinstance(v, GemmView)]
    if any(v.op in _PLANS for v in views):
        yield model
        return
    _warn_unrecorded(views)
    plans = {}
    for view in views:
        swaps = _swaps(view)
        if swaps and view.op not in plans:
            plans[view.op] = _Plan(swaps)
    handles = []
    try:
        for op, plan in plans.items():
            _PLANS[op] = plan
            handles.append(op.register_forward_pre_hook(_pre_hook))
            handles.append(op.register_forward_hook(_post_hook, always_call=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for op, plan in plans.items():
            _PLANS.pop(op, None)
            for s in plan.swaps:
                s.owner._parameters[s.name] = s.real
