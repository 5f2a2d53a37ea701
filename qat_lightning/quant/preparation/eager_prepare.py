"""Eager-mode prepare (module swapping), from the probe run of :mod:`.eager_probe`.

:func:`prepare_eager` swaps each called quantizable module for its op module at the same path; the k-th
extra call of a shared module gets its own op module ``path#k`` (activation nodes per call site, weight
node shared) and the first one dispatches calls in order. A user's ``QuantStub`` becomes an input op,
a ``DeQuantStub`` the identity; without ``QuantStub`` every float tensor input gets an ``<arg>_quant`` op,
applied by a forward pre-hook on the model (which also resets the call-site counters; a forward hook
warns when an op ran more often than its probed call sites, see :mod:`.dynamic_block`). Fusion is the
user's fuse hook (:mod:`.eager_fusion`): each fused module becomes one op; fusable
chains left unfused (conv -> bn -> relu, linear -> relu, ...) are reported. An op's input producer is the
op whose output it is, looked up through pass-through modules and functional views
(:class:`.eager_flow.DirectSources`); none (float32, with a note) when float code changed that output in
place (``y += z``). Which op feeds which through the float code between them is kept on the model
(:func:`.eager_flow.eager_dataflow`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.quant.nodes.attention import MatMul
from qat_lightning.quant.ops import FloatOp, OpInfo, OpKind
from qat_lightning.quant.preparation.build import OpBuilder, OpPlan, matmul_module_plan
from qat_lightning.quant.preparation.dynamic_block import count_forward, warn_extra_calls
from qat_lightning.quant.preparation.eager_flow import (
    DATAFLOW_ATTR,
    CallKey,
    Changed,
    InputSource,
    resolve_dataflow,
)
from qat_lightning.quant.preparation.eager_fusion import fused_parts, fused_plan, unfused_chains
from qat_lightning.quant.preparation.eager_probe import CallEvent, Probe, input_names, probe_model
from qat_lightning.quant.preparation.op_costs import gemm_module_flops, numel_of
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    METHOD_OPS,
    OpNamer,
    gemm_spec_of,
    is_dequant_stub,
    is_stub,
    module_op_type,
)
from qat_lightning.quant.qconfig.qconfig import QConfig

__all__ = [
    "CallEvent",
    "Probe",
    "probe_model",
    "EagerPrepared",
    "prepare_eager",
    "input_names",
]  # probe: re-exported


@dataclass
class EagerPrepared:
    """Result of :func:`prepare_eager`."""

    model: nn.Module
    plans: list[OpPlan]
    unfused: list[tuple[str, ...]]
    not_covered: list[str]
    notes: list[str]
    float_ops: list[FloatOp] = field(default_factory=list)


def _eager_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    count_forward(module)
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
    planner = _EagerPlanner(model, probe)
    planner.plan_inputs(model, probe, args, kwargs)
    for ev in planner.events:
        planner.plan_event(ev)
    plans = planner.plans
    qconfigs = assign([p.info for p in plans])
    builder = OpBuilder(qconfigs, qat_mode, device)
    _install_ops(model, planner, builder)
    not_covered, float_ops = _uncovered_ops(model, probe, plans, qconfigs, planner.switched)
    unfused = unfused_chains(planner.events, planner.modules)
    notes = [
        f"not fused (fuse them in a fuse hook: fuse_fn / fuse_model()): {' + '.join(c)}" for c in unfused
    ]
    notes += planner.notes + builder.notes
    inputs = {arg_name: name for _, arg_name, name in planner.input_specs}
    flow = resolve_dataflow(
        probe.flow, probe.flow_error, planner.call_ops, planner.through, inputs, [p.info for p in plans]
    )
    setattr(model, DATAFLOW_ATTR, flow)
    if flow.error is not None or flow.untraced:
        why = flow.error or f"the output of {', '.join(flow.untraced)} goes where the probe cannot follow it"
        notes.append(f"data flow between the ops unknown ({why}): io_quant_nodes refuses this model")
    return EagerPrepared(model, plans, unfused, not_covered, notes, float_ops)


class _EagerPlanner:
    """Plans one op per quantizable module call of the probe run, in call order (names and producers)."""

    def __init__(self, model: nn.Module, probe: Probe) -> None:
        self.modules = dict(model.named_modules())
        self.aliases: dict[int, list[str]] = {}
        for path, mod in model.named_modules(remove_duplicate=False):
            if path:
                self.aliases.setdefault(id(mod), []).append(path)
        self.namer = OpNamer(taken=lambda parent, child: _taken(model, parent, child))
        self.plans: list[OpPlan] = []
        self.input_ops: dict[str, str] = {}  # model input name -> its input op
        self.input_specs: list[tuple[int | None, str, str]] = []
        self.sources: dict[CallKey, tuple[InputSource, ...]] = {}  # module call -> its inputs' sources
        self.probed = probe.flow.inputs if probe.flow is not None else {}  # ... looking through views too
        self.notes: list[str] = []
        self.switched: dict[str, str] = {}
        self.call_ops: dict[tuple[str, int], str] = {}  # module call -> its op (the data flow)
        self.through: set[tuple[str, int]] = set()  # pass-through module calls
        self.fused = {
            path: parts for path, mod in self.modules.items() if (parts := fused_parts(mod)) is not None
        }
        self.events = [ev for ev in probe.events if not any(ev.path.startswith(f"{f}.") for f in self.fused)]
        self.dynamic = _dynamic_paths(self.events)

    def producer(self, source: InputSource) -> str | None:
        """Name of the op whose output ``source`` is (looked up through pass-through modules), else ``None``.

        ``None`` also for a :class:`.Changed` output: what the consumer reads is the float result of an
        in-place op eager mode does not quantize, not the producer's quantized output.
        """
        for _ in range(10_000):
            if source is None or isinstance(source, Changed):
                return None
            if isinstance(source, str):
                return self.input_ops.get(source)
            if source in self.call_ops or source not in self.through:
                return self.call_ops.get(source)
            ins = self.sources.get(source, ())
            source = ins[0] if ins else None
        return None

    def producers(self, key: CallKey, count: int | None = None) -> tuple[str | None, ...]:
        """Input producers of module call ``key`` (its first ``count`` tensor inputs; at least one)."""
        sources = self.sources.get(key, ())[:count] or (None,)
        return tuple(self.producer(s) for s in sources)

    def _note_changed(self, name: str, key: CallKey) -> None:
        """Note each input of op ``name`` that is a quantized output changed in place by float code."""
        for i, source in enumerate(self.sources.get(key, ())):
            original = self.producer(source.source) if isinstance(source, Changed) else None
            if original is not None:
                self.notes.append(
                    f"{name}: input {i} is the output of {original} changed in place by code eager mode "
                    "does not quantize (y += z, y.add_(z), x.mul_(w), inplace=True, ...): it reads float32 "
                    f"values, not {original}'s quantized output"
                )

    def plan_inputs(
        self, model: nn.Module, probe: Probe, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        """Plan a quant point per floating model input, unless the user placed ``QuantStub``s."""
        if any(is_stub(m) for m in self.modules.values()):
            return
        names = input_names(model, args, kwargs)
        values = list(args) + list(kwargs.values())
        for i, (arg_name, value) in enumerate(zip(names, values, strict=True)):
            if isinstance(value, Tensor) and value.is_floating_point():
                name = self.namer.input_op(arg_name)
                info = OpInfo(name, "quant", OpKind.INPUT, "", 0, (), value.numel())
                self.plans.append(OpPlan(info, "input"))
                self.input_specs.append((i if i < len(args) else None, arg_name, name))
                self.input_ops[arg_name] = name

    def plan_event(self, ev: CallEvent) -> None:
        """Plan the op of one module call (none for a transparent module or a later dynamic call)."""
        mod = self.modules.get(ev.path)
        if mod is None:
            return
        key = (ev.path, ev.call_index)
        self.sources[key] = self.probed.get(key, ev.sources)
        dynamic_op = self.dynamic.get(ev.path)
        if dynamic_op is not None:  # later calls of one dynamic call site
            self.call_ops[key] = dynamic_op
            return
        if ev.path in self.fused:
            self.call_ops[key] = self._plan_fused(ev)
            self._note_changed(self.call_ops[key], key)
            return
        op_type = module_op_type(mod)
        if op_type is None:
            self.through.add(key)
            return
        name = self._plan_module(ev, mod, op_type)
        if name is None:
            return
        self.call_ops[key] = name
        self._note_changed(name, key)
        if ev.path in self.dynamic:
            self.dynamic[ev.path] = name
        if ev.switched_off is not None:
            self.switched[name] = ev.switched_off

    def _plan_fused(self, ev: CallEvent) -> str:
        name, k = self.namer.module_op(ev.path)
        shapes = (ev.in_shape, ev.out_shape)
        producers = self.producers((ev.path, ev.call_index))
        self.plans.append(fused_plan(name, k, ev.path, self.fused[ev.path], producers, shapes))
        self.switched.update({name: ev.switched_off} if ev.switched_off is not None else {})
        self.dynamic.update({ev.path: name} if ev.path in self.dynamic else {})
        return name

    def _plan_module(self, ev: CallEvent, mod: nn.Module, op_type: str) -> str | None:
        """Plan a stub, gemm or other module op; ``None`` for a module whose output is not float."""
        key = (ev.path, ev.call_index)
        if is_stub(mod):
            name, k = self.namer.module_op(ev.path)
            info = OpInfo(
                name, "quant", OpKind.INPUT, ev.path, k, self.producers(key, 1), numel_of(ev.out_shape)
            )
            self.plans.append(OpPlan(info, "input", extra={"path": ev.path}))
            return name
        if isinstance(mod, MatMul):  # decomposed attention's matmuls: a functional gemm
            name, k = self.namer.module_op(ev.path)
            producers = self.producers(key, 2)
            plan = matmul_module_plan(name, k, ev.path, producers, (ev.in_shape, ev.out_shape), mod)
            plan.extra["path"] = ev.path
            self.plans.append(plan)
            return name
        spec = gemm_spec_of(mod)
        if spec is not None and getattr(mod, "weight", None) is not None:
            name, k = self.namer.module_op(ev.path)
            flops = gemm_module_flops(mod, ev.in_shape, ev.out_shape)
            info = OpInfo(name, op_type, OpKind.GEMM, ev.path, k, self.producers(key, 1), flops)
            self.plans.append(
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
            return name
        if ev.out_float:
            name, k = self.namer.module_op(ev.path)
            producers = self.producers(key)
            info = OpInfo(name, op_type, OpKind.OTHER, ev.path, k, producers, numel_of(ev.out_shape))
            self.plans.append(OpPlan(info, "module", module=mod, extra={"path": ev.path}))
            return name
        return None


def _install_ops(model: nn.Module, planner: _EagerPlanner, builder: OpBuilder) -> None:
    """Build the planned ops and put them in place (call sites, aliases, input ops, the forward hooks)."""
    sites: dict[str, list[nn.Module]] = {}
    input_ops: dict[str, nn.Module] = {}
    for plan in planner.plans:
        op = builder.build(plan)
        path = plan.extra.get("path")
        if path is None:
            input_ops[plan.name] = op
        else:
            sites.setdefault(path, []).append(op)
    dispatchers = []
    for path, ops in sites.items():
        for alias in planner.aliases.get(id(planner.modules[path]), [path]):
            _set_path(model, alias, ops[0])
        for k, op in enumerate(ops[1:], start=1):
            _set_path(model, f"{path}#{k}", op)
        ops[0]._sites = list(ops)  # call-site dispatch and the call counter (warn_extra_calls)
        ops[0]._dynamic = path in planner.dynamic
        dispatchers.append(ops[0])
    for path, mod in planner.modules.items():
        if path and is_dequant_stub(mod):
            for alias in planner.aliases.get(id(mod), [path]):
                _set_path(model, alias, nn.Identity())
    for name, op in input_ops.items():
        model.add_module(name, op)
    model._qat_dispatchers = dispatchers
    model._qat_input_ops = planner.input_specs
    if dispatchers or planner.input_specs:
        model.register_forward_pre_hook(_eager_pre_hook, with_kwargs=True)
    if dispatchers:
        model.register_forward_hook(warn_extra_calls, always_call=True)


def _uncovered_ops(
    model: nn.Module,
    probe: Probe,
    plans: Sequence[OpPlan],
    qconfigs: Mapping[str, QConfig],
    switched: Mapping[str, str],
) -> tuple[list[str], list[FloatOp]]:
    """List the functional ops eager mode cannot quantize, and every op left float32 (switched or functional).

    The functional ops are the probe's: every float op run outside the swapped modules, data movement
    excepted (what fx quantizes or lists in its ``float_ops``).
    """
    fn_namer = OpNamer(taken=lambda parent, child: _taken(model, parent, child))
    not_covered = []
    float_ops = _switched_ops(plans, qconfigs, switched)
    quantizable = {*FUNCTION_OPS.values(), *METHOD_OPS.values(), "scaled_dot_product_attention"}
    for parent, call, base, flops in probe.functions:
        name = fn_namer.function_op(parent, call, base)
        not_covered.append(f"{name} ({base})")
        why = "a functional op eager mode cannot quantize" if base in quantizable else _NO_IMPLEMENTATION
        float_ops.append(FloatOp(name, base, flops, why))
    return not_covered, float_ops


_NO_IMPLEMENTATION = "no quantized implementation of this function (fx leaves it float32 too)"


def _dynamic_paths(events: Sequence[CallEvent]) -> dict[str, str | None]:
    """Paths called inside dynamic blocks (-> their one op name, filled while planning)."""
    inside = {ev.path for ev in events if ev.dynamic}
    mixed = sorted({ev.path for ev in events if not ev.dynamic and ev.path in inside})
    if mixed:
        raise ValueError(
            f"{', '.join(mixed)}: called both inside and outside dynamic_block(); a dynamic block's modules "
            "share one call site for all its iterations, so give the other uses their own modules"
        )
    return dict.fromkeys(sorted(inside))


def _switched_ops(
    plans: Sequence[OpPlan], qconfigs: Mapping[str, QConfig], switched: Mapping[str, str]
) -> list[FloatOp]:
    """Ops called while a switch was disabled in forward (FakeCast only matters to float16 outputs)."""
    found = []
    for plan in plans:
        switch = switched.get(plan.name)
        out = qconfigs[plan.name].output_dtype
        if switch == "GlobalFakeQuantSwitch" or (switch and out is not None and out.is_float16):
            reason = f"{switch} disabled in forward"  # a debugging switch: not a chip violation
            found.append(FloatOp(plan.name, plan.info.op_type, plan.info.flops, reason, on_chip=False))
    return found


def _taken(model: nn.Module, parent: str, child: str) -> bool:
    try:
        mod = model.get_submodule(parent) if parent else model
    except AttributeError:
        return False
    return child in mod._modules or child in mod._parameters or child in mod._buffers
