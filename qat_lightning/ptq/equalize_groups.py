"""Where equalization can move scale between tensors without changing the float function.

Found on an fx graph of the float model (the graph's modules are the model's own), three patterns:

* **cross-layer** (CLE): conv/linear ``A`` [-> BatchNorm] [-> ReLU / Dropout / Identity] -> conv/linear
  ``B``, every tensor in between used once. Output channel ``j`` of ``A`` (of the BN's affine when there is
  one) is divided by ``s_j`` and input channel ``j`` of ``B`` multiplied by it (ReLU is positively
  homogeneous).
* **layernorm** (SmoothQuant): a LayerNorm whose output feeds only Linear layers: its weight and bias are
  divided by ``s``, the Linears' input columns multiplied by it.
* **matmul** (SmoothQuant on both activations): ``matmul(a, b)`` where ``a`` and ``b`` each come from a
  Linear through layout ops only (view, reshape, transpose, permute, contiguous, multiply or divide by a
  number), each tensor used once: output feature ``j`` of ``a``'s Linear is divided by ``s_j``, that of
  ``b``'s multiplied. The feature-to-contracted-dim mapping is not derived symbolically: the driver checks
  on a batch that the change kept the function and undoes it otherwise.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["FINDERS", "ScaleGroup", "find_groups"]

_GEMMS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PASS_MODULES = (nn.ReLU, nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = (F.relu, torch.relu, F.dropout)
_LAYOUT_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten")
_LAYOUT_FUNCTIONS = (torch.transpose, torch.reshape, torch.permute, torch.flatten)
_SCALAR_FUNCTIONS = (operator.mul, operator.truediv, torch.mul, torch.div)
_MATMULS = (torch.matmul, operator.matmul, torch.bmm)


@dataclass
class ScaleGroup:
    """Tensors sharing one per-channel scale ``s``, keeping the float function.

    ``divide`` ones are divided by it, ``multiply`` ones multiplied, each along its channel dim.

    Attributes:
        kind: ``cross_layer``, ``layernorm`` or ``matmul``.
        name: ``producer -> consumers`` in module names.
        divide: ``(parameter, dim)`` pairs divided by ``s``.
        multiply: ``(parameter, dim)`` pairs multiplied by ``s``.
        probes: graph nodes whose inputs get quantized (the consumers), for the alpha search.
        act_nodes: nodes whose output range per last-dim channel enters the SmoothQuant formula
            (layernorm: the LayerNorm; matmul: the Linears of ``a`` and of ``b``).
        weight_ranges: cross-layer only: the producer's per-output-channel and the consumer's
            per-input-channel weight ranges (BN folded into the producer).
    """

    kind: str
    name: str
    divide: list[tuple[Tensor, int]] = field(default_factory=list)
    multiply: list[tuple[Tensor, int]] = field(default_factory=list)
    probes: list[fx.Node] = field(default_factory=list)
    act_nodes: list[fx.Node] = field(default_factory=list)
    weight_ranges: Callable[[], tuple[Tensor, Tensor]] | None = None

    def params(self) -> list[Tensor]:
        """Every parameter the group changes."""
        return [p for p, _ in self.divide + self.multiply]


def _module(gm: fx.GraphModule, node: object, types: tuple[type, ...]) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, types):
            return mod
    return None


def _is_metadata(node: fx.Node) -> bool:
    """Tell whether ``node`` only reads the shape (``t.shape``, ``t.size()``, ``t.dim()``)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_method" and node.target in ("size", "dim")


def _single_use(node: fx.Node) -> bool:
    return sum(not _is_metadata(user) for user in node.users) == 1


def _is_pass(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
        return True
    return _module(gm, node, _PASS_MODULES) is not None


def _gemm_groups_ok(mod: nn.Module) -> bool:
    return getattr(mod, "groups", 1) == 1


def _channel_max(t: Tensor, dim: int) -> Tensor:
    return t.abs().movedim(dim, 0).reshape(t.shape[dim], -1).amax(1)


def _out_ranges(producer: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None) -> Tensor:
    """Per-output-channel ``max |w|`` of the producer, with an eval-mode BN folded in."""
    w = producer.weight.detach()
    if bn is not None:
        fold = bn.running_var.add(bn.eps).rsqrt() * bn.weight.detach()
        w = w * fold.reshape((-1,) + (1,) * (w.dim() - 1))
    return _channel_max(w, 0)


def _cross_layer(gm: fx.GraphModule, node: fx.Node) -> ScaleGroup | None:
    consumer = _module(gm, node, _GEMMS)
    if consumer is None or not _gemm_groups_ok(consumer) or not node.args:
        return None
    prev = node.args[0]
    while isinstance(prev, fx.Node) and _single_use(prev) and _is_pass(gm, prev):
        prev = prev.args[0]
    bn = _module(gm, prev, (nn.modules.batchnorm._BatchNorm,))
    if bn is not None:
        if not (_single_use(prev) and bn.affine):
            return None
        prev = prev.args[0]
    producer = _module(gm, prev, _GEMMS)
    if producer is None or not _single_use(prev) or not _gemm_groups_ok(producer):
        return None
    if producer.weight.shape[0] != consumer.weight.shape[1] or type(producer) is not type(consumer):
        return None
    group = ScaleGroup("cross_layer", f"{prev.target} -> {node.target}", probes=[prev, node])
    group.weight_ranges = lambda: (_out_ranges(producer, bn), _channel_max(consumer.weight.detach(), 1))
    owner = bn if bn is not None else producer
    group.divide = [(owner.weight, 0)] + ([(owner.bias, 0)] if owner.bias is not None else [])
    group.multiply = [(consumer.weight, 1)]
    return group


def _layernorm(gm: fx.GraphModule, node: fx.Node) -> ScaleGroup | None:
    ln = _module(gm, node, (nn.LayerNorm,))
    users = [user for user in node.users if not _is_metadata(user)]
    if ln is None or not ln.elementwise_affine or len(ln.normalized_shape) != 1 or not users:
        return None
    linears = [_module(gm, user, (nn.Linear,)) for user in users]
    if any(lin is None or user.args[0] is not node for lin, user in zip(linears, users, strict=True)):
        return None
    names = ", ".join(str(u.target) for u in users)
    group = ScaleGroup("layernorm", f"{node.target} -> {names}", probes=users, act_nodes=[node])
    group.divide = [(ln.weight, 0)] + ([(ln.bias, 0)] if ln.bias is not None else [])
    group.multiply = [(lin.weight, 1) for lin in linears if lin is not None]
    return group


def _is_layout(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _LAYOUT_METHODS:
        return True
    if node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS:
        return True
    return (
        node.op == "call_function"
        and node.target in _SCALAR_FUNCTIONS
        and len(node.args) == 2
        and isinstance(node.args[1], (int, float))
    )


def _linear_source(gm: fx.GraphModule, value: object) -> fx.Node | None:
    """Return the Linear node ``value`` comes from through single-use layout ops, or ``None``."""
    node = value
    while isinstance(node, fx.Node) and _single_use(node) and _is_layout(node):
        node = node.args[0]
    if isinstance(node, fx.Node) and _single_use(node) and _module(gm, node, (nn.Linear,)) is not None:
        return node
    return None


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target == "matmul"
    )


def _matmul(gm: fx.GraphModule, node: fx.Node) -> ScaleGroup | None:
    if not _is_matmul(node) or len(node.args) < 2:
        return None
    src_a, src_b = (_linear_source(gm, arg) for arg in node.args[:2])
    if src_a is None or src_b is None or src_a.target == src_b.target:
        return None
    lin_a, lin_b = gm.get_submodule(str(src_a.target)), gm.get_submodule(str(src_b.target))
    if lin_a.out_features != lin_b.out_features:
        return None
    name = f"{src_a.target} @ {src_b.target} -> {node.name}"
    group = ScaleGroup("matmul", name, probes=[node], act_nodes=[src_a, src_b])
    group.divide = [(lin_a.weight, 0)] + ([(lin_a.bias, 0)] if lin_a.bias is not None else [])
    group.multiply = [(lin_b.weight, 0)] + ([(lin_b.bias, 0)] if lin_b.bias is not None else [])
    return group


FINDERS: dict[str, Callable[[fx.GraphModule, fx.Node], ScaleGroup | None]] = {
    "cross_layer": _cross_layer,
    "layernorm": _layernorm,
    "matmul": _matmul,
}
"""Pattern finders by group kind, in the order equalization applies them."""


def find_groups(gm: fx.GraphModule, kinds: tuple[str, ...]) -> list[ScaleGroup]:
    """Every scale group of the given kinds in ``gm``, kind by kind in :data:`FINDERS` order."""
    groups: list[ScaleGroup] = []
    for kind, finder in FINDERS.items():
        if kind in kinds:
            groups += [g for node in gm.graph.nodes if (g := finder(gm, node)) is not None]
    return groups
