"""Eager-mode prepare (module swapping) and the probe run of the float model.

:func:`probe_model` runs the float model once on the example inputs with forward hooks on every module
and a ``TorchFunctionMode``: it yields the call count of every module, the call order of the quantizable
modules (which tensor each one consumed and produced), and the functional ops/operators called outside
quantizable modules (what eager mode cannot quantize).

:func:`prepare_eager` swaps each called quantizable module for its op module at the same path; the k-th
extra call of a shared module gets its own op module ``path#k`` (activation nodes per call site, weight
node shared) and the first one dispatches calls in order. A user's ``QuantStub`` becomes an input op,
a ``DeQuantStub`` the identity; without ``QuantStub`` every float tensor input gets an ``<arg>_quant`` op,
applied by a forward pre-hook on the model (which also resets the call-site counters). Nothing is fused:
fusable chains (conv -> bn -> relu, linear -> relu, ...) are reported as unfused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.preparation.build import OpBuilder, OpPlan
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    METHOD_OPS,
    PASS_THROUGH_MODULES,
    OpNamer,
    gemm_module_flops,
    gemm_spec_of,
    is_dequant_stub,
    is_stub,
    module_op_type,
    numel_of,
)
from qat_lightning.quant.qconfig import QConfig

__all__ = ["CallEvent", "Probe", "probe_model", "EagerPrepared", "prepare_eager", "input_names"]

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


@dataclass
class Probe:
    """What the probe run saw."""

    output: Any
    call_counts: dict[str, int]
    events: list[CallEvent] = field(default_factory=list)
    functions: list[tuple[str, int, str]] = field(default_factory=list)  # (parent, parent call, base)
    input_ids: dict[str, int] = field(default_factory=dict)


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
    try:
        return FUNCTION_OPS.get(func)
    except TypeError:  # unhashable
        return None


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, stack: list[tuple[str, int, bool]], out: list[tuple[str, int, str]]) -> None:
        super().__init__()
        self.stack = stack
        self.out = out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        result = func(*args, **(kwargs or {}))
        if self.stack and self.stack[-1][2]:
            return result  # inside a module that eager mode swaps (conv, relu, ...): covered
        base = _function_base(func)
        if base is not None and isinstance(result, Tensor) and result.is_floating_point():
            floats = [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]
            if floats:
                parent, call = (self.stack[-1][0], self.stack[-1][1]) if self.stack else ("", 0)
                self.out.append((parent, call, base))
        return result


def _tensor_ids(args: Any) -> tuple[int, ...]:
    return tuple(id(a) for a in args if isinstance(a, Tensor))


def probe_model(
    model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], record_functions: bool = True
) -> Probe:
    """Run ``model`` (a throw-away copy) once with hooks; see the module docstring.

    Exceptions of the model propagate unchanged.
    """
    counts: dict[str, int] = {}
    stack: list[tuple[str, int, bool]] = []
    events: list[CallEvent] = []
    keep: list[Any] = []  # keep tensors alive so their ids stay unique during the run
    handles = []
    paths = {id(m): p for p, m in model.named_modules()}

    def pre_hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        path = paths[id(module)]
        k = counts.get(path, 0)
        counts[path] = k + 1
        covered = module_op_type(module) is not None or isinstance(module, PASS_THROUGH_MODULES)
        stack.append((path, k, covered))

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        path, k, covered = stack.pop()
        if not covered:
            return
        keep.append((inputs, output))
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
            )
        )

    for path, module in model.named_modules():
        if path:
            counts.setdefault(path, 0)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
    functions: list[tuple[str, int, str]] = []
    names = input_names(model, args, kwargs)
    values = list(args) + list(kwargs.values())
    input_ids = {n: id(v) for n, v in zip(names, values, strict=True) if isinstance(v, Tensor)}
    try:
        with torch.no_grad():
            if record_functions:
                with _FunctionRecorder(stack, functions):
                    output = model(*args, **kwargs)
            else:
                output = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return Probe(output, counts, events, functions, input_ids)


@dataclass
class EagerPrepared:
    """Result of :func:`prepare_eager`."""

    model: nn.Module
    plans: list[OpPlan]
    unfused: list[tuple[str, ...]]
    not_covered: list[str]
    notes: list[str]


def _eager_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for op in module._qat_dispatchers:
        op._calls = 0
    specs = module._qat_input_ops
    if not specs:
        return None
    args_l = list(args)
    for position, key, op_name in specs:
        op = getattr(module, op_name)
        if key in kwargs:
            kwargs[key] = op(kwargs[key])
        elif position is not None and position < len(args_l):
            args_l[position] = op(args_l[position])
    return tuple(args_l), kwargs


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent.add_module(attr, module)


def _unfused_chains(events: Sequence[CallEvent], modules: Mapping[str, nn.Module]) -> list[tuple[str, ...]]:
    consumers: dict[int, list[CallEvent]] = {}
    for ev in events:
        if ev.in_ids:
            consumers.setdefault(ev.in_ids[0], []).append(ev)

    def follower(ev: CallEvent, kinds: tuple[type, ...]) -> CallEvent | None:
        for nxt in consumers.get(ev.out_id, []) if ev.out_id is not None else []:
            if isinstance(modules.get(nxt.path), kinds):
                return nxt
        return None

    def site(ev: CallEvent) -> str:
        return ev.path if ev.call_index == 0 else f"{ev.path}#{ev.call_index}"

    chains = []
    for ev in events:
        mod = modules.get(ev.path)
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        chain = [site(ev)]
        bn = follower(ev, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        last = ev
        if bn is not None:
            chain.append(site(bn))
            last = bn
        relu = follower(last, (nn.ReLU,))
        if relu is not None:
            chain.append(site(relu))
        if len(chain) > 1:
            chains.append(tuple(chain))
    return chains


def prepare_eager(
    model: nn.Module,
    probe: Probe,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    assign: Callable[[Sequence[OpInfo]], Mapping[str, QConfig]],
    qat_mode: str,
    device: torch.device | None,
) -> EagerPrepared:
    """Swap the quantizable modules of ``model`` (a copy of the float model) for op modules, in place.

    Args:
        model: the float model copy to change.
        probe: :func:`probe_model` of another copy of the same model on the same inputs.
        args: the positional example inputs (for the model-input quant points).
        kwargs: the keyword example inputs.
        assign: op infos (call order) -> QConfig per op name.
        qat_mode: recorded only (eager mode fuses nothing).
        device: device for the new quant nodes.
    """
    modules = dict(model.named_modules())
    aliases: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if path:
            aliases.setdefault(id(mod), []).append(path)
    has_stub = any(is_stub(m) for m in modules.values())
    namer = OpNamer(taken=lambda parent, child: _taken(model, parent, child))
    plans: list[OpPlan] = []
    by_id: dict[int, str] = {}
    input_specs: list[tuple[int | None, str, str]] = []
    names = input_names(model, args, kwargs)
    values = list(args) + list(kwargs.values())
    if not has_stub:
        for i, (arg_name, value) in enumerate(zip(names, values, strict=True)):
            if isinstance(value, Tensor) and value.is_floating_point():
                name = namer.input_op(arg_name)
                info = OpInfo(name, "quant", OpKind.INPUT, "", 0, (), value.numel())
                plans.append(OpPlan(info, "input"))
                input_specs.append((i if i < len(args) else None, arg_name, name))
                if arg_name in probe.input_ids:
                    by_id[probe.input_ids[arg_name]] = name
    transparent: dict[int, int] = {}

    def producer(tid: int | None) -> str | None:
        seen = 0
        while tid is not None and tid not in by_id and tid in transparent and seen < 10_000:
            tid, seen = transparent[tid], seen + 1
        return by_id.get(tid) if tid is not None else None

    for ev in probe.events:
        mod = modules.get(ev.path)
        if mod is None:
            continue
        op_type = module_op_type(mod)
        if op_type is None:
            if ev.out_id is not None and ev.in_ids:
                transparent[ev.out_id] = ev.in_ids[0]
            continue
        first_in = ev.in_ids[0] if ev.in_ids else None
        if is_stub(mod):
            name, k = namer.module_op(ev.path)
            info = OpInfo(
                name, "quant", OpKind.INPUT, ev.path, k, (producer(first_in),), numel_of(ev.out_shape)
            )
            plans.append(OpPlan(info, "input", extra={"path": ev.path}))
        else:
            spec = gemm_spec_of(mod)
            if spec is not None and getattr(mod, "weight", None) is not None:
                name, k = namer.module_op(ev.path)
                flops = gemm_module_flops(mod, ev.in_shape, ev.out_shape)
                info = OpInfo(name, op_type, OpKind.GEMM, ev.path, k, (producer(first_in),), flops)
                plans.append(
                    OpPlan(
                        info,
                        "gemm",
                        module=mod,
                        gemm_kind=spec.kind,
                        weight_ch_axis=spec.weight_ch_axis,
                        weight_key=ev.path,
                        extra={"path": ev.path},
                    )
                )
            elif ev.out_float:
                name, k = namer.module_op(ev.path)
                producers = tuple(producer(t) for t in ev.in_ids)
                info = OpInfo(name, op_type, OpKind.OTHER, ev.path, k, producers, numel_of(ev.out_shape))
                plans.append(OpPlan(info, "module", module=mod, extra={"path": ev.path}))
            else:
                continue
        if ev.out_id is not None:
            by_id[ev.out_id] = name
    qconfigs = assign([p.info for p in plans])
    builder = OpBuilder(qconfigs, qat_mode, device)
    sites: dict[str, list[nn.Module]] = {}
    input_ops: dict[str, nn.Module] = {}
    for plan in plans:
        op = builder.build(plan)
        path = plan.extra.get("path")
        if path is None:
            input_ops[plan.name] = op
        else:
            sites.setdefault(path, []).append(op)
    dispatchers = []
    for path, ops in sites.items():
        for alias in aliases.get(id(modules[path]), [path]):
            _set_path(model, alias, ops[0])
        for k, op in enumerate(ops[1:], start=1):
            _set_path(model, f"{path}#{k}", op)
        if len(ops) > 1:
            ops[0]._sites = list(ops)
            dispatchers.append(ops[0])
    for path, mod in modules.items():
        if path and is_dequant_stub(mod):
            for alias in aliases.get(id(mod), [path]):
                _set_path(model, alias, nn.Identity())
    for name, op in input_ops.items():
        model.add_module(name, op)
    model._qat_dispatchers = dispatchers
    model._qat_input_ops = input_specs
    if dispatchers or input_specs:
        model.register_forward_pre_hook(_eager_pre_hook, with_kwargs=True)
    fn_namer = OpNamer(taken=lambda parent, child: _taken(model, parent, child))
    not_covered = []
    for parent, call, base in probe.functions:
        not_covered.append(f"{fn_namer.function_op(parent, call, base)} ({base})")
    unfused = _unfused_chains(probe.events, modules)
    notes = [f"not fused (eager mode does not fuse): {' + '.join(chain)}" for chain in unfused]
    notes += builder.notes
    return EagerPrepared(model, plans, unfused, not_covered, notes)


def _taken(model: nn.Module, parent: str, child: str) -> bool:
    try:
        mod = model.get_submodule(parent) if parent else model
    except AttributeError:
        return False
    return child in mod._modules or child in mod._parameters or child in mod._buffers
