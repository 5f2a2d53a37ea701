"""Plain-torch QAT helpers: which scales to pin, whether an LR schedule warms up, BatchNorm freezing.

The seed's QAT advice as checks a plain-torch loop can call (the ``QuantizationAwareTraining`` callback
calls them from its hooks): no LR warmup (:func:`find_lr_warmup` inspects a scheduler), "fixing or updating
input/output scales" (:func:`io_quant_nodes`, :func:`activation_nodes`) and the "freeze BN" trick
(:func:`freeze_batchnorm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import lr_scheduler as sched

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, iter_fake_quantize
from qat_lightning.quant.ops import OpKind, iter_quant_ops
from qat_lightning.quant.preparation.eager_flow import eager_dataflow

__all__ = ["BN_TYPES", "activation_nodes", "find_lr_warmup", "freeze_batchnorm", "io_quant_nodes"]

_LAMBDA_PROBE_STEPS = 2000
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
"""The module types the BN modes act on."""


# ----------------------------------------------------------------------------------------------- warmup
def _lambdas(scheduler: Any) -> list[Callable[[int], float]]:
    fns = getattr(scheduler, "lr_lambdas", None)
    return [f for f in (fns or []) if callable(f)]


def _rising_lambda(fn: Callable[[int], float], steps: int) -> tuple[int, float, float] | None:
    try:
        start = float(fn(0))
        for t in range(1, steps + 1):
            value = float(fn(t))
            if value > start * (1 + 1e-6) + 1e-12:
                return t, start, value
    except Exception:  # noqa: BLE001 - a lambda that cannot be probed is not judged
        return None
    return None


def _children(scheduler: Any) -> list[Any]:
    return list(getattr(scheduler, "_schedulers", None) or [])


def find_lr_warmup(scheduler: Any, steps: int = _LAMBDA_PROBE_STEPS) -> str | None:
    """Say why ``scheduler`` warms the learning rate up, or return ``None`` when it does not.

    Recognised: ``LinearLR`` rising (``start_factor < end_factor``), ``ConstantLR`` with ``factor < 1``,
    ``OneCycleLR`` and ``CyclicLR`` (both start low and rise), ``LambdaLR`` / ``MultiplicativeLR`` whose
    factor rises above its step-0 value within ``steps`` steps (e.g. ``transformers``' warmup schedules), and
    any of these inside ``SequentialLR`` / ``ChainedScheduler``.
    """
    name = type(scheduler).__name__
    for child in _children(scheduler):
        reason = find_lr_warmup(child, steps)
        if reason is not None:
            return f"{name} contains a warmup: {reason}"
    if isinstance(scheduler, sched.LinearLR) and scheduler.start_factor < scheduler.end_factor:
        return (
            f"LinearLR rises from {scheduler.start_factor:g}x to {scheduler.end_factor:g}x of the base LR "
            f"over {scheduler.total_iters} steps"
        )
    if isinstance(scheduler, sched.ConstantLR) and scheduler.factor < 1 and scheduler.total_iters > 0:
        return (
            f"ConstantLR runs at {scheduler.factor:g}x of the base LR for {scheduler.total_iters} steps, "
            "then jumps up"
        )
    if isinstance(scheduler, sched.OneCycleLR):
        return "OneCycleLR starts at max_lr / div_factor and rises to max_lr (its first phase is a warmup)"
    if isinstance(scheduler, sched.CyclicLR):
        return "CyclicLR starts at base_lr and rises to max_lr"
    if isinstance(scheduler, sched.MultiplicativeLR):
        for fn in _lambdas(scheduler):
            try:
                if any(float(fn(t)) > 1.0 + 1e-9 for t in range(1, min(steps, 200) + 1)):
                    return "MultiplicativeLR multiplies the LR by a factor > 1"
            except Exception:  # noqa: BLE001
                continue
    for fn in _lambdas(scheduler):
        found = _rising_lambda(fn, steps)
        if found is not None:
            t, start, value = found
            return f"{name}'s factor rises from {start:g} at step 0 to {value:g} at step {t}"
    return None


# ----------------------------------------------------------------------------------------------- scales
def io_quant_nodes(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    """Return the model's input/output quant nodes: outputs of its INPUT ops and of its last ops.

    The last ops are those whose output feeds no other quantized op (from the producers recorded by
    ``prepare``; for an eager-prepared model, from the data flow its probe run followed through the
    functional ops eager mode leaves float, so fx and eager give the same nodes). Without op records the
    first and last quant nodes are used.

    Raises:
        ValueError: for an eager-prepared model whose data flow ``prepare`` could not follow (the message
            says why and how to pin nodes by name instead).
    """
    ops = list(iter_quant_ops(model))
    picked: list[tuple[str, FakeQuantize]] = []
    if ops:
        consumed = {p for _, op in ops for p in op.op_info.input_producers if p}
        consumed |= _eager_consumed(model)
        for name, op in ops:
            info = op.op_info
            node = getattr(op, "output_quant", None)
            if isinstance(node, FakeQuantize) and (info.kind == OpKind.INPUT or name not in consumed):
                picked.append((f"{name}.output_quant", node))
        return picked
    nodes = [(n, q) for n, q in iter_fake_quantize(model) if q.ch_axis is None]
    return [nodes[0], nodes[-1]] if len(nodes) > 1 else nodes


def _eager_consumed(model: nn.Module) -> set[str]:
    """Return the ops feeding another op in the eager-prepared models in ``model`` (their data flow)."""
    consumed: set[str] = set()
    for module in model.modules():
        if getattr(getattr(module, "prepare_record", None), "method", None) != "eager":
            continue
        flow = eager_dataflow(module)
        why = None
        if flow is None:
            why = "it carries no data flow record (it was not prepared by this version's prepare())"
        elif flow.error is not None:
            why = flow.error
        elif flow.untraced:
            why = (
                f"the output of {', '.join(flow.untraced)} goes into code the probe run cannot follow "
                "(e.g. a C extension or numpy) or nowhere, so whether it is a model output is unknown"
            )
        if why is not None:
            raise ValueError(
                "io_quant_nodes: this model was prepared with method='eager' (or the 'auto' fallback to "
                f"eager), and its input/output ops are unknown: {why}. Prepare it with method='fx' if fx "
                "can trace it, or pin the nodes you mean by name: set_qat_scales(model, 'fixed', "
                "[model.get_submodule(name) for name in names]) with names from iter_fake_quantize(model)"
            )
        consumed |= flow.consumed()
    return consumed


def activation_nodes(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    """Return every integer per-tensor (activation) quant node."""
    return [(n, q) for n, q in iter_fake_quantize(model) if q.ch_axis is None and q.dtype.is_integer]


def freeze_batchnorm(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put every BatchNorm of ``model`` in eval mode (frozen running statistics).

    Returns:
        ``(module, previous training flag)`` for each BatchNorm, to restore them afterwards.
    """
    saved = [(m, m.training) for m in model.modules() if isinstance(m, BN_TYPES)]
    for module, _ in saved:
        module.eval()
    return saved
