"""The probe run of the float model, for eager-mode prepare (and the call counts of every prepare).

:func:`probe_model` runs the float model once on the example inputs with forward hooks on every module
and a ``TorchFunctionMode``: it yields the call count of every module, the call order of the quantizable
(and fused, pass-through) modules (which tensor each one consumed and produced, whether a switch was
disabled in ``forward`` or a :func:`.dynamic_block` was active), and the functional
ops/operators called outside quantizable modules with their FLOPs (what eager mode cannot quantize)
and the data flow between the module calls through them (:mod:`.eager_flow`), both only with
``record_functions``. The switches are restored after the run.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch
from qat_lightning.quant.preparation.dynamic_block import in_dynamic_block
from qat_lightning.quant.preparation.eager_flow import FlowTracker, ProbeFlow
from qat_lightning.quant.preparation.eager_fusion import fused_parts
from qat_lightning.quant.preparation.op_costs import function_flops
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    METHOD_OPS,
    PASS_THROUGH_MODULES,
    module_op_type,
)

__all__ = ["CallEvent", "Probe", "probe_model", "input_names"]

_TENSOR_METHOD = type(torch.Tensor.add)


@dataclass(frozen=True)
class CallEvent:
    """One call of a quantizable (or pass-through) module during the probe run."""

    path: str
    call_index: int
    in_ids: tuple[int, ...]
    out_id: int | None
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    out_float: bool
    switched_off: str | None = None  # the switch disabled in forward while this call ran
    dynamic: bool = False  # called inside a dynamic_block()


@dataclass
class Probe:
    """What the probe run saw."""

    output: Any
    call_counts: dict[str, int]
    events: list[CallEvent] = field(default_factory=list)
    functions: list[tuple[str, int, str, int]] = field(default_factory=list)  # (parent, call, base, flops)
    input_ids: dict[str, int] = field(default_factory=dict)
    flow: ProbeFlow | None = None  # recorded with record_functions
    flow_error: str | None = None  # why ``flow`` is missing (set by prepare)


def input_names(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
    """Names of the example inputs: ``forward``'s parameter names for positional ones, then the keys."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(len(args)):
        ok = i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        names.append(params[i].name if ok else f"input_{i}")
    return names + list(kwargs)


def _function_base(func: Any) -> str | None:
    if isinstance(func, _TENSOR_METHOD):
        return METHOD_OPS.get(func.__name__)
    if func is F.scaled_dot_product_attention:  # fx decomposes it; eager can only report it (float32)
        return "scaled_dot_product_attention"
    try:
        return FUNCTION_OPS.get(func)
    except TypeError:  # unhashable
        return None


class _FunctionRecorder(TorchFunctionMode):
    def __init__(
        self, stack: list[tuple[Any, ...]], out: list[tuple[str, int, str, int]], flow: FlowTracker
    ) -> None:
        super().__init__()
        self.stack = stack
        self.out = out
        self.flow = flow

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        result = func(*args, **(kwargs or {}))
        if self.stack and self.stack[-1][2]:
            return result  # inside a module that eager mode swaps (conv, relu, ...): covered
        self.flow.function(func, args, kwargs or {}, result)
        base = _function_base(func)
        if base is not None and isinstance(result, Tensor) and result.is_floating_point():
            floats = [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]
            if floats:
                parent, call = (self.stack[-1][0], self.stack[-1][1]) if self.stack else ("", 0)
                shapes = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
                equation = args[0] if base == "einsum" and isinstance(args[0], str) else None
                flops = function_flops(base, shapes, tuple(result.shape), equation)
                self.out.append((parent, call, base, flops))
        return result


def _switched_off() -> str | None:
    if not GlobalFakeQuantSwitch._enabled:
        return "GlobalFakeQuantSwitch"
    return None if FakeCastSwitch._enabled else "FakeCastSwitch"


def _tensor_ids(args: Any) -> tuple[int, ...]:
    return tuple(id(a) for a in args if isinstance(a, Tensor))


def probe_model(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], record_functions: bool = True
) -> Probe:
    """Run ``model`` (a throw-away copy) once with hooks; see the module docstring.

    Exceptions of the model propagate unchanged.
    """
    counts: dict[str, int] = {}
    stack: list[tuple[str, int, bool, str | None, bool]] = []
    events: list[CallEvent] = []
    keep: list[Any] = []  # keep tensors alive so their ids stay unique during the run
    handles = []
    paths = {id(m): p for p, m in model.named_modules()}
    names = input_names(model, args, kwargs)
    values = list(args) + list(kwargs.values())
    flow = FlowTracker(dict(zip(names, values, strict=True))) if record_functions else None

    def pre_hook(module: nn.Module, inputs: tuple[Any, ...], kw: dict[str, Any]) -> None:
        path = paths[id(module)]
        k = counts.get(path, 0)
        counts[path] = k + 1
        covered = module_op_type(module) is not None or isinstance(module, PASS_THROUGH_MODULES)
        covered = covered or fused_parts(module) is not None
        stack.append((path, k, covered, _switched_off(), in_dynamic_block()))
        if covered and flow is not None:
            flow.module_call((path, k), inputs, kw)

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        path, k, covered, off, dynamic = stack.pop()
        if not covered:
            return
        keep.append((inputs, output))
        if flow is not None:
            flow.module_output((path, k), output)
        first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        out = output if isinstance(output, Tensor) else None
        events.append(
            CallEvent(
                path,
                k,
                _tensor_ids(inputs),
                id(out) if out is not None else None,
                tuple(first.shape) if first is not None else None,
                tuple(out.shape) if out is not None else None,
                out is not None and out.is_floating_point(),
                off,
                dynamic,
            )
        )

    for path, module in model.named_modules():
        if path:
            counts.setdefault(path, 0)
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(hook))
    functions: list[tuple[str, int, str]] = []
    input_ids = {n: id(v) for n, v in zip(names, values, strict=True) if isinstance(v, Tensor)}
    switches = (GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled)
    try:
        with torch.no_grad():
            if flow is not None:
                with _FunctionRecorder(stack, functions, flow):
                    output = model(*args, **kwargs)
            else:
                output = model(*args, **kwargs)
    finally:
        GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled = switches
        for h in handles:
            h.remove()
    return Probe(output, counts, events, functions, input_ids, flow.finish(output) if flow else None)
