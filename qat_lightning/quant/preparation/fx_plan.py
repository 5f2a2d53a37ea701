"""Planning for fx-mode prepare: classify, name and describe every op of a traced graph.

:class:`FxPlanner` walks the graph in order and produces one
:class:`~qat_lightning.quant.preparation.build.OpPlan` per quantized node or fused group, with its
:class:`~qat_lightning.quant.ops.OpInfo` (name, type, kind, producers, FLOPs). Names follow
:class:`~qat_lightning.quant.preparation.tables.OpNamer`; a functional op takes the module whose forward
called it from ``node.meta["nn_module_stack"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from qat_lightning.quant.nodes.attention import MatMul
from qat_lightning.quant.ops import FloatOp, OpInfo, OpKind
from qat_lightning.quant.preparation.build import OpPlan, matmul_module_plan
from qat_lightning.quant.preparation.fusion import FusionGroup, fused_op_type
from qat_lightning.quant.preparation.fx_float_ops import float_op_of
from qat_lightning.quant.preparation.fx_masks import MASK_REASON, ValueKinds
from qat_lightning.quant.preparation.fx_sdpa import (
    ADD,
    MUL,
    SDPA_FLOAT_REASON,
    SdpaPlan,
    bind_sdpa,
    sdpa_scale,
)
from qat_lightning.quant.preparation.fx_tracer import NodeMeta
from qat_lightning.quant.preparation.op_costs import function_flops, gemm_module_flops, numel_of
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    GEMM_FUNCTIONS,
    METHOD_OPS,
    PASS_THROUGH_MODULES,
    TRANSPARENT_FUNCTIONS,
    TRANSPARENT_METHODS,
    OpNamer,
    gemm_spec_of,
    is_stub,
    module_op_type,
)

__all__ = ["FxPlanner", "SDPA"]

SDPA = F.scaled_dot_product_attention
_MASKABLE = frozenset({"add", "sub", "mul", "div"})


def _parent_of(node: Node) -> tuple[str, int]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", 0
    key, value = next(reversed(stack.items()))
    call = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    return str(value[0]), call


def _tensor_nodes(args: Any) -> list[Node]:
    found: list[Node] = []
    fx.node.map_arg(args, found.append)
    return found


class FxPlanner:
    """Walks the traced graph in order and plans one op per quantized node (or fused group)."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, meta: Mapping[Node, NodeMeta]) -> None:
        self.gm = gm
        self.region: set[Node] | None = None  # jit_strip: only these nodes (QuantStub .. DeQuantStub)
        self.graph = gm.graph
        self.meta = meta
        self.modules = dict(gm.named_modules())
        self.namer = OpNamer(taken=lambda parent, child: _taken(model, parent, child))
        self.plans: list[OpPlan] = []
        self.node_op: dict[Node, str] = {}
        self.node_names: dict[Node, str] = {}
        self.notes: list[str] = []
        self.float_ops: list[FloatOp] = []
        self.sdpa: dict[Node, SdpaPlan] = {}
        self.kinds = ValueKinds(self.graph, meta)
        self.act: set[Node] = self.kinds.act
        self.maskish: set[Node] = self.kinds.maskish

    # ---- classification --------------------------------------------------------------------------------
    def _float_act(self, node: Node) -> bool:
        m = self.meta.get(node)
        return node in self.act and m is not None and m.is_tensor and m.is_float

    def _shape(self, node: Any) -> tuple[int, ...] | None:
        m = self.meta.get(node) if isinstance(node, Node) else None
        return m.shape if m is not None else None

    def _transparent(self, node: Node) -> bool:
        if node.op == "call_method":
            return node.target in TRANSPARENT_METHODS
        if node.op == "call_function":
            return node.target in TRANSPARENT_FUNCTIONS
        if node.op == "call_module":
            return isinstance(self.modules.get(str(node.target)), PASS_THROUGH_MODULES)
        return False

    def producer(self, node: Any) -> str | None:
        """Name of the op whose output feeds ``node`` (looking through view/reshape/dropout/...)."""
        for _ in range(10_000):
            if not isinstance(node, Node):
                return None
            if node in self.node_op:
                return self.node_op[node]
            if not self._transparent(node) or not node.args:
                return None
            node = node.args[0]
            if isinstance(node, (list, tuple)):
                node = node[0] if node else None
        return None

    # ---- planning --------------------------------------------------------------------------------------
    def _add(self, plan: OpPlan, output_node: Node) -> None:
        self.plans.append(plan)
        self.node_op[output_node] = plan.name

    def plan(self, groups: Sequence[FusionGroup], has_stub: bool) -> None:
        """Plan every op of the graph (``self.plans``, graph order); ``groups`` are the fused groups."""
        member_of = {n: g for g in groups for n in g.nodes}
        group_names: dict[int, dict[Node, str]] = {id(g): {} for g in groups}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if not has_stub:
            for ph in placeholders:
                if self._float_act(ph):
                    name = self.namer.input_op(str(ph.target))
                    info = OpInfo(name, "quant", OpKind.INPUT, "", 0, (), numel_of(self._shape(ph)))
                    self._add(OpPlan(info, "input", node=ph, extra={"placeholder": True}), ph)
        for node in self.graph.nodes:
            if self.region is not None and node not in self.region:
                self._note_unknown(node, "outside the QuantStub .. DeQuantStub region (jit_strip)", False)
            elif node.op == "call_module":
                self._plan_module(node, member_of, group_names)
            elif node.op in ("call_function", "call_method"):
                self._plan_function(node, member_of, group_names)

    def _plan_module(self, node: Node, member_of: dict, group_names: dict) -> None:
        target = str(node.target)
        mod = self.modules[target]
        op_type = module_op_type(mod)
        if op_type is None:
            reason = "no quant points inside (FLOPs: its output size, a lower bound)"
            if not isinstance(mod, PASS_THROUGH_MODULES) and self._note_unknown(node, reason):
                self.notes.append(f"kept float (no quant points inside): {target} ({type(mod).__name__})")
            return
        name, k = self.namer.module_op(target)
        self.node_names[node] = name
        if is_stub(mod):
            info = OpInfo(name, "quant", OpKind.INPUT, target, k, (self.producer(node.args[0]),), 0)
            self._add(OpPlan(info, "input", node=node), node)
            return
        group = member_of.get(node)
        if group is not None:
            group_names[id(group)][node] = name
            if node is group.last:
                self._plan_fused(group, group_names[id(group)])
            return
        if isinstance(mod, MatMul):  # decomposed attention's matmuls: a functional gemm
            producers = tuple(self.producer(a) for a in node.args[:2])
            shapes = (self._shape(node.args[0]), self._shape(node))
            self._add(matmul_module_plan(name, k, target, producers, shapes, mod, node=node), node)
            return
        spec = gemm_spec_of(mod)
        x = node.args[0] if node.args else None
        if spec is not None and getattr(mod, "weight", None) is not None:
            flops = gemm_module_flops(mod, self._shape(x), self._shape(node))
            info = OpInfo(name, op_type, OpKind.GEMM, target, k, (self.producer(x),), flops)
            plan = OpPlan(info, "gemm", module=mod, gemm_kind=spec.kind, weight_ch_axis=spec.weight_ch_axis)
            plan.weight_key, plan.node = target, node
            self._add(plan, node)
            return
        if not self._float_act(node):
            return
        producers = tuple(self.producer(a) for a in _tensor_nodes(node.args) if a in self.act)
        info = OpInfo(name, op_type, OpKind.OTHER, target, k, producers, numel_of(self._shape(node)))
        self._add(OpPlan(info, "module", module=mod, node=node), node)

    def _plan_fused(self, group: FusionGroup, names: dict[Node, str]) -> None:
        gemm_node = group.gemm
        target = str(gemm_node.target)
        gemm = self.modules[target]
        spec = gemm_spec_of(gemm)
        name = names[gemm_node]
        x = gemm_node.args[0]
        producers = [self.producer(x)]
        if group.add is not None:
            producers.append(self.producer(group.residual))
        flops = gemm_module_flops(gemm, self._shape(x), self._shape(gemm_node))
        info = OpInfo(name, fused_op_type(gemm, group), OpKind.GEMM, target, 0, tuple(producers), flops)
        plan = OpPlan(
            info,
            "convbn" if group.bn is not None else "gemm",
            module=gemm,
            bn=self.modules[str(group.bn.target)] if group.bn is not None else None,
            gemm_kind=spec.kind,
            weight_ch_axis=spec.weight_ch_axis,
            relu=group.relu is not None,
            add=group.add is not None,
            weight_key=target,
            node=group,
        )
        self._add(plan, group.last)
        members = []
        for n in group.nodes:
            members.append(names.get(n) or self.node_names.get(n) or str(n.target))
        plan.extra["members"] = tuple(members)

    def _function_base(self, node: Node) -> str | None:
        if node.op == "call_function":
            return FUNCTION_OPS.get(node.target)  # type: ignore[arg-type]
        return METHOD_OPS.get(str(node.target))

    def _plan_function(self, node: Node, member_of: dict, group_names: dict) -> None:
        if node.op == "call_function" and node.target is SDPA:
            self._plan_sdpa(node)
            return
        base = self._function_base(node)
        if base is None:
            self._note_unknown(node)
            return
        parent, pcall = _parent_of(node)
        group = member_of.get(node)
        if group is not None:
            name = self.namer.function_op(parent, pcall, base)
            self.node_names[node] = name
            group_names[id(group)][node] = name
            if node is group.last:
                self._plan_fused(group, group_names[id(group)])
            return
        if not self._float_act(node):
            return
        inputs = _tensor_nodes((node.args, node.kwargs))
        if base in _MASKABLE and any(a in self.maskish for a in inputs):
            name = self.namer.function_op(parent, pcall, base)
            self._mask_op(name, base, f"{name} ({node.name})", numel_of(self._shape(node)))
            return
        name = self.namer.function_op(parent, pcall, base)
        self.node_names[node] = name
        arg_shapes = [self._shape(a) for a in node.args]
        flops = function_flops(base, arg_shapes, self._shape(node))
        gemm = GEMM_FUNCTIONS.get(base)
        act_args: tuple[int, ...] = ()
        weight_arg = None
        weight = None
        weight_key = None
        if gemm is not None:
            positions, w_pos, _ = gemm
            if all(i < len(node.args) and isinstance(node.args[i], Node) for i in positions):
                act_args = positions
            if w_pos is not None and w_pos < len(node.args) and isinstance(node.args[w_pos], Node):
                w_node = node.args[w_pos]
                w_shape = self._shape(w_node)
                if w_shape:
                    weight_arg = w_pos
                    weight = torch.empty(w_shape, device="meta")
                    weight_key = str(w_node.target) if w_node.op == "get_attr" else None
        is_gemm = bool(act_args) and (weight_arg is not None or base in ("matmul", "bmm"))
        if is_gemm:
            producers = tuple(self.producer(node.args[i]) for i in act_args)
        else:
            act_args, weight_arg, weight = (), None, None
            producers = tuple(self.producer(a) for a in inputs if a in self.act)
        info = OpInfo(
            name,
            base,
            OpKind.GEMM if is_gemm else OpKind.OTHER,
            parent,
            pcall,
            producers,
            flops,
            is_matmul=is_gemm and base in ("matmul", "bmm"),
        )
        plan = OpPlan(
            info,
            "function",
            target=node.target if node.op == "call_function" else str(node.target),
            is_method=node.op == "call_method",
            act_args=act_args,
            weight_arg=weight_arg,
            weight=weight,
            weight_key=weight_key,
            node=node,
        )
        self._add(plan, node)

    def _note_unknown(self, node: Node, reason: str = "", on_chip: bool = True) -> bool:
        """Record a float op left unquantized (not views, lookups); return whether it is a float output."""
        m = self.meta.get(node)
        floats = m is not None and ((m.is_tensor and m.is_float) or m.is_tensor_seq) and node in self.act
        if node.op in ("call_module", "call_function", "call_method") and floats:
            op = float_op_of(node, self.modules, self._shape, _parent_of(node)[0], reason, on_chip)
            if op is not None:
                self.float_ops.append(op)
        return floats

    def _mask_op(self, name: str, op_type: str, what: str, flops: int) -> None:
        """Record ``name`` as a float32 op with a mask-like operand (left without quant points)."""
        self.notes.append(f"not quantized: {what} has {MASK_REASON}")
        self.float_ops.append(FloatOp(name, op_type, flops, MASK_REASON))

    def _sdpa_flops(self, q: Any, k: Any, node: Node) -> int:
        """Multiply-accumulates of sdpa's two matmuls (``q @ k^T`` and ``probs @ v``); 0 if unknown."""
        qs, ks, out = self._shape(q) or (), self._shape(k) or (), self._shape(node) or ()
        if len(qs) < 2 or len(ks) < 2 or not out:
            return numel_of(out) if out else 0
        return numel_of((*qs[:-1], ks[-2])) * qs[-1] + numel_of(out) * ks[-2]

    def _plan_sdpa(self, node: Node) -> None:
        if not self._float_act(node):
            return
        bound = bind_sdpa(node)
        parent, pcall = _parent_of(node)
        q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
        dropout, gqa = bound.get("dropout_p", 0.0), bound.get("enable_gqa", False)
        constant = isinstance(dropout, (int, float)) and isinstance(gqa, bool)
        if not (all(isinstance(t, Node) for t in (q, k, v)) and constant):
            name = self.namer.function_op(parent, pcall, "scaled_dot_product_attention")
            flops = self._sdpa_flops(q, k, node)
            self.float_ops.append(FloatOp(name, "scaled_dot_product_attention", flops, SDPA_FLOAT_REASON))
            self.notes.append(f"not quantized: {name} ({SDPA_FLOAT_REASON})")
            return
        qs, ks, out = self._shape(q) or (), self._shape(k) or (), self._shape(node)
        s = ks[-2] if len(ks) >= 2 else 1
        shape = (*qs[:-1], s)
        scores = numel_of(shape)
        op = self.namer.function_op
        mm1, mul = op(parent, pcall, "matmul"), op(parent, pcall, "mul")

        def plan(name: str, op_type: str, producers: tuple, flops: int, target: Any, gemm: bool) -> None:
            kind = OpKind.GEMM if gemm else OpKind.OTHER
            info = OpInfo(name, op_type, kind, parent, pcall, producers, flops, is_matmul=gemm)
            self.plans.append(
                OpPlan(info, "function", target=target, act_args=(0, 1) if gemm else (), node=node)
            )

        plan(
            mm1,
            "matmul",
            (self.producer(q), self.producer(k)),
            scores * (qs[-1] if qs else 1),
            torch.matmul,
            True,
        )
        plan(mul, "mul", (mm1,), function_flops("mul", [shape, None], shape), MUL, False)
        mask_node, causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
        mask, last = None, mul
        if isinstance(mask_node, Node) or causal:
            add = op(parent, pcall, "add")
            m = self.meta.get(mask_node) if isinstance(mask_node, Node) else None
            additive = m is not None and m.is_float and self.kinds.real(mask_node)
            if additive and not causal:  # a real activation (a learned bias): quantized, as in eager code
                producers = (mul, self.producer(mask_node))
                plan(add, "add", producers, function_flops("add", [shape, shape], shape), ADD, False)
                mask, last = add, add
            else:
                self._mask_op(add, "add", f"{add} (the attention mask of {node.name})", scores)
                mask, last = "float", None
        sm, mm2 = op(parent, pcall, "softmax"), op(parent, pcall, "matmul")
        plan(sm, "softmax", (last,), scores, F.softmax, False)
        plan(mm2, "matmul", (sm, self.producer(v)), numel_of(out) * s, torch.matmul, True)
        self.node_op[node] = mm2
        drop = op(parent, pcall, "dropout") if dropout else None
        scale = sdpa_scale(qs[-1] if qs else 1, bound.get("scale"))
        self.sdpa[node] = SdpaPlan(mm1, mul, mask, sm, mm2, scale, drop, float(dropout), gqa)


def _taken(model: nn.Module, parent: str, child: str) -> bool:
    try:
        mod = model.get_submodule(parent) if parent else model
    except AttributeError:
        return False
    if child in mod._modules or child in mod._parameters or child in mod._buffers:
        return True
    return not parent and hasattr(fx.GraphModule, child)
