"""The probe run of the float model, for eager-mode prepare (and the call counts of every prepare).

:func:`probe_model` runs the float model once on the example inputs with forward hooks on every module
and a ``TorchFunctionMode``: it yields the call count of every module, the call order of the quantizable
(and fused, pass-through) modules (which tensor each one consumed and produced, whether a switch was
disabled in ``forward`` or a :func:`.dynamic_block` was active, which module call or model input each
of its tensor inputs is: :class:`.eager_flow.DirectSources`), and the functional ops/operators called
outside quantizable modules with their FLOPs (every call computing a float tensor from float tensors
that is not data movement, fx's rule: what eager mode cannot quantize) and the data flow between the
module calls through them (:mod:`.eager_flow`), both only with ``record_functions`` (which also looks
through the functional views for the input sources). The switches are restored after the run.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch
from qat_lightning.quant.preparation.dynamic_block import in_dynamic_block
from qat_lightning.quant.preparation.eager_flow import (
    DirectSources,
    FlowTracker,
    InputSource,
    ProbeFlow,
    _tensors,
    method_base,
    tensor_method,
)
from qat_lightning.quant.preparation.eager_fusion import fused_parts
from qat_lightning.quant.preparation.fx_float_ops import _moves_data as moves_data
from qat_lightning.quant.preparation.op_costs import function_flops
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    METHOD_OPS,
    PASS_THROUGH_MODULES,
    module_op_type,
)

__all__ = ["CallEvent", "Probe", "function_base", "probe_model", "input_names"]


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
    sources: tuple[InputSource, ...] = ()  # of each tensor in ``in_ids``: its producer (eager_flow)


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


class _Call(NamedTuple):
    """What :func:`.fx_float_ops._moves_data` reads of an fx node: its kind and its target."""

    op: str
    target: Any


def _computes(func: Any) -> bool:
    """Tell whether ``func`` computes values: not data movement (fx's rule) nor an attribute read."""
    fn_name = str(getattr(func, "__name__", ""))
    if fn_name in ("__get__", "__set__") or fn_name.endswith("_like") or fn_name.startswith("new_"):
        return False  # x.T, x.data; zeros_like(x), x.new_zeros(...) read the shape only
    name = tensor_method(func)
    call = _Call("call_method", name) if name is not None else _Call("call_function", func)
    try:
        return not moves_data(call, {})  # type: ignore[arg-type]
    except TypeError:  # unhashable
        return True


def function_base(func: Any) -> str:
    """Return the base name of a function or ``Tensor`` method (``x += y``: add, ``torch.cat``: cat)."""
    name = tensor_method(func)
    if name is not None:
        base = METHOD_OPS.get(name) or (method_base(name) if name.startswith("__") else None)
        return base or name.strip("_")
    if func is F.scaled_dot_product_attention:  # fx decomposes it; eager can only report it (float32)
        return "scaled_dot_product_attention"
    try:
        base = FUNCTION_OPS.get(func)
    except TypeError:  # unhashable
        base = None
    return base or str(getattr(func, "__name__", func))


class _FunctionRecorder(TorchFunctionMode):
    """Records the float ops run outside the swapped modules and follows the data through them."""

    def __init__(self, hooks: _Hooks, out: list[tuple[str, int, str, int]], flow: FlowTracker) -> None:
        super().__init__()
        self.hooks = hooks
        self.out = out
        self.flow = flow

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        stack = self.hooks.stack
        if stack and stack[-1][2]:
            return result  # inside a module that eager mode swaps (conv, relu, ...): covered
        self.flow.function(func, args, kwargs, result)
        self.hooks.direct.function(func, args, kwargs, result)
        outs = [t for t in _tensors(result) if t.is_floating_point()]
        if outs and _computes(func) and any(t.is_floating_point() for t in _tensors((args, kwargs))):
            base = function_base(func)
            parent, call = (stack[-1][0], stack[-1][1]) if stack else ("", 0)
            shapes = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
            equation = args[0] if base == "einsum" and args and isinstance(args[0], str) else None
            flops = function_flops(base, shapes, tuple(outs[0].shape), equation)
            self.out.append((parent, call, base, flops))
        return result


def _switched_off() -> str | None:
    if not GlobalFakeQuantSwitch._enabled:
        return "GlobalFakeQuantSwitch"
    return None if FakeCastSwitch._enabled else "FakeCastSwitch"


def _tensor_ids(args: Any) -> tuple[int, ...]:
    return tuple(id(a) for a in args if isinstance(a, Tensor))


class _Hooks:
    """The probe run's forward (pre-)hooks: call counts, the module call stack and the call events."""

    def __init__(self, model: nn.Module, flow: FlowTracker | None, direct: DirectSources) -> None:
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.counts: dict[str, int] = {}
        self.stack: list[tuple[str, int, bool, str | None, bool, tuple[InputSource, ...]]] = []
        self.events: list[CallEvent] = []
        self.keep: list[Any] = []  # keep tensors alive so their ids stay unique during the run
        self.flow = flow
        self.direct = direct

    def pre_hook(self, module: nn.Module, inputs: tuple[Any, ...], kw: dict[str, Any]) -> None:
        """Count the call and push it (its input sources are read before it can change them in place)."""
        path = self.paths[id(module)]
        k = self.counts.get(path, 0)
        self.counts[path] = k + 1
        covered = module_op_type(module) is not None or isinstance(module, PASS_THROUGH_MODULES)
        covered = covered or fused_parts(module) is not None
        sources = self.direct.call_inputs(inputs) if covered else ()
        self.stack.append((path, k, covered, _switched_off(), in_dynamic_block(), sources))
        if covered and self.flow is not None:
            self.flow.module_call((path, k), inputs, kw)

    def hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Pop the call and record its :class:`CallEvent` (covered modules only)."""
        path, k, covered, off, dynamic, sources = self.stack.pop()
        if not covered:
            return
        self.keep.append((inputs, output))
        if self.flow is not None:
            self.flow.module_output((path, k), output)
        self.direct.module_output((path, k), output)
        first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        out = output if isinstance(output, Tensor) else None
        self.events.append(
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
                sources,
            )
        )


def probe_model(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], record_functions: bool = True
) -> Probe:
    """Run ``model`` (a throw-away copy) once with hooks; see the module docstring.

    Exceptions of the model propagate unchanged.
    """
    names = input_names(model, args, kwargs)
    inputs = dict(zip(names, list(args) + list(kwargs.values()), strict=True))
    flow = FlowTracker(inputs) if record_functions else None
    hooks = _Hooks(model, flow, DirectSources(inputs))
    handles = []
    for path, module in model.named_modules():
        if path:
            hooks.counts.setdefault(path, 0)
            handles.append(module.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(hooks.hook))
    functions: list[tuple[str, int, str, int]] = []
    input_ids = {n: id(v) for n, v in inputs.items() if isinstance(v, Tensor)}
    switches = (GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled)
    try:
        with torch.no_grad():
            if flow is not None:
                with _FunctionRecorder(hooks, functions, flow):
                    output = model(*args, **kwargs)
            else:
                output = model(*args, **kwargs)
    finally:
        GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled = switches
        for h in handles:
            h.remove()
    calls = {(ev.path, ev.call_index): ev.sources for ev in hooks.events}
    probe_flow = flow.finish(output, calls) if flow is not None else None
    return Probe(output, hooks.counts, hooks.events, functions, input_ids, probe_flow)
