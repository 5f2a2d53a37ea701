"""Fusion patterns on an fx graph: conv/linear + BN [+ add] [+ ReLU], conv/linear + ReLU.

A fused group becomes one op (one output quant node, after the last member), as a deployment compiler
fuses them on the chip. A group is fused only when it is safe:

* the conv / linear and the BN are each called exactly once (a shared module keeps per-call-site ops);
* every intermediate result has exactly one user;
* the BN tracks running statistics (else it cannot be folded in eval);
* linear + BN only for a 2-d linear output (``BatchNorm1d`` over features);
* for the residual add: the other input has the same shape (no broadcasting), and an in-place add
  (``out += identity``) only when the BN output is the tensor being updated.

Fusable-but-unfused pairs (a shared BN, a conv whose output is also used elsewhere, ...) are reported with
the reason, for the check report.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, Node

from qat_lightning.quant.preparation.fx_tracer import NodeMeta
from qat_lightning.quant.preparation.tables import BN_FOR_CONV, CONV_TYPES

__all__ = ["FusionGroup", "UnfusedGroup", "find_fusions", "is_relu_node", "is_add_node", "fused_op_type"]


@dataclass
class FusionGroup:
    """One fused op: ``gemm`` [-> ``bn``] [-> ``add`` with ``residual``] [-> ``relu``]."""

    gemm: Node
    bn: Node | None = None
    add: Node | None = None
    residual: Node | None = None
    relu: Node | None = None

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Member nodes in execution order."""
        return tuple(n for n in (self.gemm, self.bn, self.add, self.relu) if n is not None)

    @property
    def last(self) -> Node:
        """The node whose output is the fused op's output."""
        return self.nodes[-1]


@dataclass(frozen=True)
class UnfusedGroup:
    """A fusable chain left unfused: its member nodes and why."""

    nodes: tuple[Node, ...]
    reason: str


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def is_relu_node(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Tell whether ``node`` is a plain ReLU: ``nn.ReLU``, ``F.relu`` / ``torch.relu`` or ``.relu()``."""
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def is_add_node(node: Node) -> bool:
    """Tell whether ``node`` adds two tensors without ``alpha`` (``a + b``, ``a += b``, ``a.add(b)``)."""
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("add", "add_")
    return False


def _is_inplace_add(node: Node) -> bool:
    return (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_"
    )


def fused_op_type(gemm: nn.Module, group: FusionGroup) -> str:
    """``ConvBnReLU2d``, ``ConvBnAddReLU2d``, ``ConvReLU2d``, ``LinearBn1d``, ``LinearReLU``, ..."""
    if isinstance(gemm, CONV_TYPES):
        base, suffix = "Conv", type(gemm).__name__[-2:]
    else:
        base, suffix = "Linear", "1d" if group.bn is not None else ""
    parts = [base]
    if group.bn is not None:
        parts.append("Bn")
    if group.add is not None:
        parts.append("Add")
    if group.relu is not None:
        parts.append("ReLU")
    return "".join(parts) + suffix


def _is_gemm_bn(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    """``node`` is a BatchNorm call applied to a conv / linear call (another fusion candidate)."""
    if node.op != "call_module" or not isinstance(
        modules.get(str(node.target)), nn.modules.batchnorm._BatchNorm
    ):
        return False
    src = node.args[0] if node.args else None
    return (
        isinstance(src, Node)
        and src.op == "call_module"
        and isinstance(modules.get(str(src.target)), (*CONV_TYPES, nn.Linear))
    )


def _single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_fusions(
    graph: Graph, modules: Mapping[str, nn.Module], meta: Mapping[Node, NodeMeta]
) -> tuple[list[FusionGroup], list[UnfusedGroup]]:
    """Find the fusable groups of ``graph`` (see the module docstring) and the unfused candidates."""
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: list[FusionGroup] = []
    unfused: list[UnfusedGroup] = []
    taken: set[Node] = set()
    for node in graph.nodes:
        if node.op != "call_module" or node in taken:
            continue
        gemm = modules.get(str(node.target))
        if not (isinstance(gemm, CONV_TYPES) or type(gemm) is nn.Linear):
            continue
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        bn_type = BN_FOR_CONV[type(gemm) if type(gemm) in BN_FOR_CONV else nn.Linear]
        followers = [
            u
            for u in users
            if is_relu_node(u, modules)
            or (u.op == "call_module" and type(modules.get(str(u.target))) is bn_type)
        ]
        if calls[str(node.target)] > 1:
            if followers:
                unfused.append(
                    UnfusedGroup(
                        (node, followers[0]), f"{node.target} is called {calls[str(node.target)]} times"
                    )
                )
            continue
        if nxt is None:
            if followers:
                unfused.append(
                    UnfusedGroup((node, followers[0]), f"the output of {node.target} has {len(users)} users")
                )
            continue
        group = FusionGroup(node)
        out_meta = meta.get(node)
        if nxt.op == "call_module" and type(modules.get(str(nxt.target))) is bn_type:
            bn = modules[str(nxt.target)]
            reason = None
            if calls[str(nxt.target)] > 1:
                reason = f"{nxt.target} is called {calls[str(nxt.target)]} times"
            elif not bn.track_running_stats or bn.running_var is None:
                reason = f"{nxt.target} has no running statistics"
            elif isinstance(gemm, nn.Linear) and (
                out_meta is None or out_meta.shape is None or len(out_meta.shape) != 2
            ):
                reason = "linear + BatchNorm1d is fused only for a 2-d output"
            if reason is not None:
                unfused.append(UnfusedGroup((node, nxt), reason))
                continue
            group.bn = nxt
            nxt = _single_user(nxt)
            if nxt is not None and is_add_node(nxt):
                other = nxt.args[1] if nxt.args[0] is group.bn else nxt.args[0]
                other_meta = meta.get(other) if isinstance(other, Node) else None
                bn_meta = meta.get(group.bn)
                same_shape = (
                    other_meta is not None
                    and bn_meta is not None
                    and other_meta.is_tensor
                    and other_meta.shape == bn_meta.shape
                )
                inplace_ok = not _is_inplace_add(nxt) or nxt.args[0] is group.bn
                # the add fuses with the branch computed last (ResNet: conv2-bn2, not the downsample)
                later = (
                    isinstance(other, Node) and order[other] > order[group.bn] and _is_gemm_bn(other, modules)
                )
                if (
                    isinstance(other, Node)
                    and other is not group.bn
                    and same_shape
                    and inplace_ok
                    and not later
                    and nxt not in taken
                ):
                    group.add, group.residual = nxt, other
                    nxt = _single_user(nxt)
        if nxt is not None and nxt not in taken and is_relu_node(nxt, modules):
            group.relu = nxt
        if group.bn is None and group.relu is None:
            continue
        taken.update(group.nodes)
        groups.append(group)
    return groups, unfused
