"""Route the uses after an in-place op to the op itself, so they read its (quantized) output.

fx records ``y.add_(z); conv2(y)`` as ``add_ = y.add_(z)`` and ``conv2(y)``: ``conv2`` names ``y``
although it reads the value ``add_`` wrote into it. Prepare quantizes ``add_``'s output, but that node's
result went nowhere while ``conv2`` kept reading the float sum through ``y`` (and its report called that
input ``y``'s int8 output). An in-place op returns the tensor it mutated, so every use of that tensor
after the op can read the op's result instead: the float model computes exactly the same, and the
prepared one quantizes what the consumer really reads.

In-place here: a method ending in ``_`` (``add_``, ``mul_``, ``clamp_``, ``masked_fill_``, ...), a
function ending in ``_`` (``torch.relu_``), ``operator.i*`` on tensors, a functional with ``inplace=True``
(keyword or position), and a module with ``inplace = True`` (``nn.ReLU(inplace=True)``). The mutated
tensor is the first argument. A mutation through a view (``y[:, :4].add_(z)``) changes ``y`` without
naming it; it is left as traced.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["reroute_inplace_uses"]

_INPLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
    }
)
# position of the ``inplace`` argument of the functionals that take one
_INPLACE_POSITION = {
    F.relu: 1,
    F.relu6: 1,
    F.hardtanh: 3,
    F.leaky_relu: 2,
    F.elu: 2,
    F.selu: 1,
    F.celu: 2,
    F.threshold: 3,
    F.hardswish: 1,
    F.hardsigmoid: 1,
    F.silu: 1,
    F.mish: 1,
    F.rrelu: 4,
    F.dropout: 3,
    F.alpha_dropout: 3,
    F.dropout1d: 3,
    F.dropout2d: 3,
    F.dropout3d: 3,
}


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def is_inplace(node: Node, modules: dict[str, object]) -> bool:
    """Whether ``node`` mutates its first argument and returns it."""
    if node.op == "call_method":
        return _trailing_underscore(str(node.target))
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or _trailing_underscore(getattr(node.target, "__name__", "")):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    position = _INPLACE_POSITION.get(node.target)  # type: ignore[call-overload]
    return position is not None and len(node.args) > position and node.args[position] is True


def reroute_inplace_uses(graph: fx.Graph, modules: dict[str, object]) -> int:
    """Make every use of a mutated tensor after its in-place op read the op's result instead.

    Args:
        graph: the traced graph (changed in place).
        modules: the traced module's ``dict(named_modules())`` (for ``inplace`` modules).

    Returns:
        How many uses were rerouted.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    moved = 0
    for node in list(graph.nodes):
        if not node.args or not isinstance(node.args[0], Node) or not is_inplace(node, modules):
            continue
        mutated = node.args[0]
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
                moved += 1
    return moved
