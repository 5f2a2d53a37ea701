"""The float ops an fx-prepared graph leaves without quant points (``PrepareRecord.float_ops``).

A node with a float activation output that gets no op module computes in float32: an op with no
quantized implementation, an opaque module, a mask-like add, a node outside the ``jit_strip`` region.
Data movement (views, reshapes, indexing, ``.to``, ``.contiguous``, dropout, ...) and table lookups
(embeddings) compute nothing and are not float ops.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

from torch import nn
from torch.fx import Node

from qat_lightning.quant.ops import FloatOp
from qat_lightning.quant.preparation.op_costs import function_flops, gemm_module_flops, numel_of
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    METHOD_OPS,
    PASS_THROUGH_MODULES,
    TRANSPARENT_FUNCTIONS,
    TRANSPARENT_METHODS,
    gemm_spec_of,
    is_dequant_stub,
)

__all__ = ["LOOKUP_MODULES", "float_op_of"]

#: A table lookup, no compute: never a float op.
LOOKUP_MODULES = (nn.Embedding, nn.EmbeddingBag)
#: Functions / methods that move or pick data without computing.
_NOT_COMPUTE = frozenset(
    {
        operator.getitem,
        "getitem",
        "__getitem__",
        "to",
        "type",
        "float",
        "clone",
        "detach",
        "contiguous",
        "expand",
        "expand_as",
        "repeat",
        "masked_fill",
    }
)


def _moves_data(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in TRANSPARENT_METHODS or node.target in _NOT_COMPUTE
    if node.op == "call_function":
        return node.target in TRANSPARENT_FUNCTIONS or node.target in _NOT_COMPUTE
    mod = modules[str(node.target)]
    return isinstance(mod, (*PASS_THROUGH_MODULES, *LOOKUP_MODULES)) or is_dequant_stub(mod)


def _output_size(node: Node, shape_of: Callable[[object], tuple[int, ...] | None]) -> int:
    """Elements of ``node``'s output; for a tuple output (``MultiheadAttention``), of its used items."""
    size = numel_of(shape_of(node))
    if size == 0:
        size = sum(numel_of(shape_of(u)) for u in node.users if u.target is operator.getitem)
    return size


def float_op_of(
    node: Node,
    modules: Mapping[str, nn.Module],
    shape_of: Callable[[object], tuple[int, ...] | None],
    parent: str,
    reason: str,
    on_chip: bool,
) -> FloatOp | None:
    """Describe ``node`` (a float activation left without quant points) as a :class:`FloatOp`.

    Args:
        node: a ``call_module`` / ``call_function`` / ``call_method`` node with a float tensor output.
        modules: the graph module's ``named_modules()``.
        shape_of: a node's example output shape.
        parent: the path of the module whose forward called a functional node (for its name).
        reason: why it is left float (empty: it has no quantized implementation).
        on_chip: whether it is meant to run on the chip (``False`` outside the ``jit_strip`` region).

    Returns:
        ``None`` for nodes that only move data or look up a table.
    """
    if _moves_data(node, modules):
        return None
    reason = reason or "no quantized implementation of this function"
    if node.op == "call_module":
        mod = modules[str(node.target)]
        gemm = gemm_spec_of(mod) is not None and node.args
        flops = gemm_module_flops(mod, shape_of(node.args[0]), shape_of(node)) if gemm else None
        return FloatOp(
            str(node.target), type(mod).__name__, flops or _output_size(node, shape_of), reason, on_chip
        )
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
    name = f"{parent}.{target}" if parent else str(target)
    table = METHOD_OPS if node.op == "call_method" else FUNCTION_OPS
    base = table.get(node.target, str(target))  # type: ignore[call-overload]
    equation = node.args[0] if base == "einsum" and node.args and isinstance(node.args[0], str) else None
    flops = function_flops(base, [shape_of(a) for a in node.args], shape_of(node), equation)
    return FloatOp(name, str(target), flops, reason, on_chip)
