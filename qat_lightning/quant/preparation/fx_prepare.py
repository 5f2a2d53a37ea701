"""fx-mode prepare: trace, fuse, name and plan every op, then rewrite the graph with op modules.

The rewrite keeps the model's structure in module paths: a module op replaces its module at the same
path (``layer1.0.conv1``), a functional op is added under the module whose forward called it
(``layer1.0.add``), a model input gets ``<arg>_quant`` at the root. See
:class:`~qat_lightning.quant.preparation.tables.OpNamer` for the naming rules.

What counts as an activation (and so gets quantized): model inputs that are float tensors, outputs of
module calls, and float results of ops with at least one activation input. Values computed only from
non-float inputs (position ids) or from parameters and constants are not quantized. Mask-like values
(:mod:`.fx_masks`: attention masks from an integer *or float* ``attention_mask``, anything built from
``-inf`` / ``finfo.min`` / large constants) are never quantized, and an add/sub/mul/div with a mask-like
operand is left float (a ``-inf``/``finfo.min`` mask would otherwise wreck the output scale); both are
listed in the notes. ``F.scaled_dot_product_attention`` becomes the eager attention's ops
(:mod:`.fx_sdpa`).
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx import Node

from qat_lightning.quant.ops import FloatOp, OpInfo
from qat_lightning.quant.preparation.build import OpBuilder, OpPlan
from qat_lightning.quant.preparation.fusion import FusionGroup, find_fusions
from qat_lightning.quant.preparation.fx_inplace import reroute_inplace_uses
from qat_lightning.quant.preparation.fx_plan import SDPA, FxPlanner
from qat_lightning.quant.preparation.fx_sdpa import rewrite_sdpa, sdpa_scores
from qat_lightning.quant.preparation.fx_switches import set_switch
from qat_lightning.quant.preparation.fx_tracer import NodeMeta, trace_with_values
from qat_lightning.quant.preparation.tables import (
    PASS_THROUGH_MODULES,
    is_dequant_stub,
    is_stub,
    module_op_type,
)
from qat_lightning.quant.qconfig.qconfig import QConfig

__all__ = ["FxPrepared", "prepare_fx", "OutputRebuild", "sdpa_scores"]

_PURE_FUNCTIONS = frozenset(
    {
        builtins.getattr,
        builtins.len,
        operator.getitem,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.not_,
    }
)


class OutputRebuild(nn.Module):
    """Turns the graph's plain-dict output back into the model's output class (HF ``ModelOutput``)."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, out: dict[str, Any]) -> Any:
        """Rebuild ``cls`` from the dict."""
        try:
            return self.cls(**out)
        except TypeError:
            return self.cls(out)


@dataclass
class FxPrepared:
    """Result of :func:`prepare_fx`."""

    model: fx.GraphModule
    plans: list[OpPlan]
    fused: list[tuple[str, ...]] = field(default_factory=list)
    unfused: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    float_ops: list[FloatOp] = field(default_factory=list)


def _stub_region(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> set[Node]:
    """Nodes computed from a ``QuantStub`` output without passing a ``DeQuantStub`` (``jit_strip``)."""
    region: set[Node] = set()
    for node in graph.nodes:
        mod = modules.get(str(node.target)) if node.op == "call_module" else None
        if mod is not None and is_stub(mod):
            region.add(node)
        elif mod is not None and is_dequant_stub(mod):
            continue
        elif node.op != "output" and any(a in region for a in node.all_input_nodes):
            region.add(node)
    return region


def _switched_off(graph: fx.Graph, planner: FxPlanner, qconfigs: Mapping[str, QConfig]) -> list[FloatOp]:
    """Ops that run while ``GlobalFakeQuantSwitch`` (or, for float16 ops, ``FakeCast``) is off in forward."""
    enabled = {"GlobalFakeQuantSwitch": True, "FakeCastSwitch": True}
    before: dict[Node, bool] = {}
    where = {"GlobalFakeQuantSwitch": "", "FakeCastSwitch": ""}
    infos = {p.name: p.info for p in planner.plans}
    found: list[FloatOp] = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is set_switch:
            switch, on = node.args
            before[node] = enabled[switch]
            enabled[switch] = before.get(on, True) if isinstance(on, Node) else on  # a Node: restore
            where[switch] = node.meta.get("source_line") or ""
            continue
        name = planner.node_op.get(node)
        if name is None:
            continue
        qc = qconfigs[name]
        off = "GlobalFakeQuantSwitch" if not enabled["GlobalFakeQuantSwitch"] else None
        fp16 = qc.output_dtype is not None and qc.output_dtype.is_float16
        if off is None and not enabled["FakeCastSwitch"] and fp16:
            off = "FakeCastSwitch"
        if off is not None:
            info = infos[name]
            # a debugging switch: float in simulation, meaningless on the chip (not a chip violation)
            found.append(FloatOp(name, info.op_type, info.flops, f"{off} disabled in forward", on_chip=False))
            planner.notes.append(f"{name} runs in float: {off} disabled in forward at {where[off] or '?'}")
    return found


def _is_leaf(module: nn.Module) -> bool:
    """Tell whether fx keeps ``module`` as one node instead of tracing into it.

    Leaves: quantizable and pass-through types, attention / RNN modules, and torch.nn modules without
    children; torch.nn containers (``TransformerEncoderLayer``) and user modules are traced through.
    """
    if module_op_type(module) is not None or isinstance(module, (*PASS_THROUGH_MODULES, *_OPAQUE)):
        return True
    return module.__module__.startswith(("torch.nn", "torch.ao.nn")) and not module._modules


_OPAQUE = (nn.MultiheadAttention, nn.RNNBase)


def _remove_dead_code(graph: fx.Graph, meta: Mapping[Node, NodeMeta]) -> None:
    def impure(node: Node) -> bool:
        if node.op in ("placeholder", "output"):
            return True
        if node.op == "get_attr":
            return False
        if node.op == "call_function" and node.target in _PURE_FUNCTIONS:
            return False
        m = meta.get(node)
        if node.op == "call_method" and m is not None and not m.is_tensor and not m.is_tensor_seq:
            return False  # .size(), .dim(), ... results feeding nothing
        return True

    graph.eliminate_dead_code(is_impure_node=impure)


def _rewrite(
    gm: fx.GraphModule, planner: FxPlanner, ops: Mapping[str, nn.Module], output_type: type | None
) -> None:
    graph = gm.graph
    for name, op in ops.items():
        gm.add_submodule(name, op)
    for sdpa in planner.sdpa.values():
        if sdpa.dropout is not None:  # follows train() / eval(), as the traced code meant
            gm.add_submodule(sdpa.dropout, nn.Dropout(sdpa.dropout_p))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    sdpa_done: set[Node] = set()
    for plan in planner.plans:
        node = plan.node
        if plan.build == "input" and plan.extra.get("placeholder"):
            with graph.inserting_after(placeholders[-1]):
                new = graph.call_module(plan.name, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        elif isinstance(node, FusionGroup):
            group = node
            args = (group.gemm.args[0],)
            if group.add is not None:  # read the add's args now: an earlier rewrite may have replaced them
                a, b = group.add.args[0], group.add.args[1]
                args = (group.gemm.args[0], b if a is group.bn else a)
            with graph.inserting_before(group.last):
                new = graph.call_module(plan.name, args)
            group.last.replace_all_uses_with(new)
            for member in reversed(group.nodes):
                graph.erase_node(member)
        elif node.op == "call_module":
            node.target = plan.name
        elif node.target is SDPA and plan.info.op_type != "scaled_dot_product_attention":
            if node in sdpa_done:
                continue
            sdpa_done.add(node)
            rewrite_sdpa(graph, node, planner.sdpa[node])
        else:
            with graph.inserting_before(node):
                new = graph.call_module(plan.name, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_module" and is_dequant_stub(planner.modules.get(str(node.target), nn.Module())):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    if output_type is not None:
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        gm.add_submodule("_qat_output", OutputRebuild(output_type))
        with graph.inserting_before(out):
            new = graph.call_module("_qat_output", (out.args[0],))
        out.args = (new,)


def _delete_unused_paths(gm: fx.GraphModule) -> None:
    """Delete every submodule path the graph does not use.

    ``GraphModule.delete_all_unused_submodules`` misses a module that is also reachable at a used path
    (a fused BN lives on inside the fused op, but its old path must go, or ``train()`` would reach it twice).
    """
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    deleted: list[str] = []
    for name, _ in list(gm.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(d + ".") for d in deleted):
            continue
        inside_used = any(name.startswith(u + ".") for u in used)
        if name not in used and not inside_used:
            gm.delete_submodule(name)
            deleted.append(name)


def prepare_fx(
    model: nn.Module,
    shadow: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    assign: Callable[[Sequence[OpInfo]], Mapping[str, QConfig]],
    qat_mode: str,
    device: torch.device | None,
    output_type: type | None = None,
    verify: Callable[[nn.Module], None] | None = None,
    strip: bool = False,
) -> FxPrepared:
    """Trace ``model`` and build its prepared :class:`~torch.fx.GraphModule`.

    Args:
        model: the (already copied) float model; its modules end up inside the op modules.
        shadow: another copy of the float model, run to compute example values.
        args: positional example inputs.
        kwargs: keyword example inputs.
        assign: op infos (graph order) -> QConfig per op name (the qconfig setter).
        qat_mode: BN mode of fused conv-bn ops.
        device: device for new quant nodes.
        output_type: a ``dict`` subclass to rebuild the output as (HF ``ModelOutput``), or ``None``.
        verify: called with the traced float GraphModule (before any rewrite); raises when it does not
            reproduce the model.
        strip: ``jit_strip``: quantize only what lies between a ``QuantStub`` and a ``DeQuantStub``.

    Raises:
        FxTraceError: when fx cannot trace the model.
    """
    traced = trace_with_values(model, shadow, args, kwargs, _is_leaf)
    gm, meta = traced.graph_module, traced.meta
    reroute_inplace_uses(gm.graph, dict(gm.named_modules()))  # later uses read the in-place op's output
    _remove_dead_code(gm.graph, meta)
    if verify is not None:
        gm.recompile()
        verify(gm)
    modules = dict(gm.named_modules())
    groups, unfused = find_fusions(gm.graph, modules, meta)
    has_stub = any(n.op == "call_module" and is_stub(modules[str(n.target)]) for n in gm.graph.nodes)
    region = None
    if strip:
        if not has_stub:
            raise ValueError(
                "prepare(method='jit_strip') quantizes only what lies between QuantStub and DeQuantStub, "
                "but the model calls no QuantStub; add them, or use method='fx'"
            )
        region = _stub_region(gm.graph, modules)
        groups = [g for g in groups if all(n in region for n in g.nodes)]
    planner = FxPlanner(gm, model, meta)
    planner.region = region
    planner.plan(groups, has_stub)
    qconfigs = assign([p.info for p in planner.plans])
    float_ops = planner.float_ops + _switched_off(gm.graph, planner, qconfigs)
    builder = OpBuilder(qconfigs, qat_mode, device)
    ops = {plan.name: builder.build(plan) for plan in planner.plans}
    _rewrite(gm, planner, ops, output_type)
    for node in gm.graph.nodes:  # the trace's module stacks name the float model's modules: torch.export
        node.meta.pop("nn_module_stack", None)  # would nest the prepared ones wrongly (unflatten breaks)
    gm.graph.lint()
    gm.recompile()
    _delete_unused_paths(gm)
    fused = [p.extra["members"] for p in planner.plans if "members" in p.extra]
    unfused_names = []
    notes = list(dict.fromkeys(planner.notes)) + builder.notes
    for group in unfused:
        names = tuple(planner.node_names.get(n) or str(n.target) for n in group.nodes)
        unfused_names.append(names)
        notes.append(f"not fused: {' + '.join(names)} ({group.reason})")
    if model.training:
        notes.append(
            "traced in train mode: Python code that reads self.training was fixed to train mode "
            "(dropout / BN modules still follow train() / eval())"
        )
    return FxPrepared(gm, planner.plans, fused, unfused_names, notes, float_ops)
