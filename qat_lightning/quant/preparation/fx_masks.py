"""Which values of a traced graph are activations (quantized) and which are mask-like (never quantized).

An activation is a float model input (without ``QuantStub``), a module output, or a result computed from
at least one activation. A *mask-like* value is an attention mask or anything of its kind: adding it to
scores with an int8 output quant point would give the output a scale of ~1e36 (every score rounds to 0),
so an add/sub/mul/div with a mask-like operand is left float32 (see :mod:`.fx_plan`). A value is
mask-like when it

* comes from an integer or bool model input only (``attention_mask`` as int64, position ids), or from a
  float input whose example value holds ``-inf`` / ``finfo.min`` (an additive mask passed in);
* is put together from a bool tensor (``.to(torch.bool)``, ``.bool()``, comparisons, ``~``, logical ops)
  by ``where`` / ``masked_fill`` with constant values, at least one of them large (``finfo.min``,
  ``-inf``, ``-10000.0``): HuggingFace's mask from a *float* ``attention_mask`` of 0./1.;
* is built from such a large constant: ``(1.0 - mask) * finfo.min``, ``torch.full(..., -inf)``,
  ``x.new_full(..., finfo.min)``, a buffer holding ``-inf`` (a registered causal mask);
* or is computed from mask-like values only.

``where`` / ``masked_fill`` applied to an activation (``scores.masked_fill(~mask, -inf)``) stays an
activation: it is the masked scores, not a mask.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.fx import Node

from qat_lightning.quant.preparation.fx_tracer import NodeMeta

__all__ = ["MASK_CONSTANT", "MASK_REASON", "ValueKinds", "is_mask_constant"]

#: A constant at least this large (in absolute value) makes a mask: ``-10000.0`` (old BERT),
#: ``finfo.min``, ``-inf``. Far beyond any activation an int8 / int16 scale is meant for.
MASK_CONSTANT = 1e4
#: Why an op with a mask-like operand is left float (``FloatOp.reason`` and the prepare notes).
MASK_REASON = "a mask-like operand (an attention mask: from an integer/bool input or large constants)"

_WHERE = frozenset({torch.where, "where"})
_MASKED_FILL = frozenset({torch.masked_fill, "masked_fill", "masked_fill_"})
_MUL = frozenset({operator.mul, torch.mul, "mul", "mul_"})
_FULL = frozenset({torch.full, torch.full_like, "new_full", "fill_"})


def is_mask_constant(value: Any) -> bool:
    """Tell whether ``value`` is a Python number large enough to make a mask (``>= MASK_CONSTANT``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isinf(value) or abs(value) >= MASK_CONSTANT


def _target(node: Node) -> Any:
    target = node.target
    if node.op == "call_function":
        return getattr(target, "__wrapped__", target)  # the tracer wraps tensor factories
    return target


class ValueKinds:
    """The activations and the mask-like values of a traced graph (one pass, graph order).

    Args:
        graph: the traced graph.
        meta: example-value facts per node (:func:`~.fx_tracer.trace_with_values`).

    Attributes:
        act: activations (float or not: a bool made from an activation is one too).
        maskish: mask-like values (never quantized; an op combining one with an activation stays float).
    """

    def __init__(self, graph: fx.Graph, meta: Mapping[Node, NodeMeta]) -> None:
        self.meta = meta
        self.act: set[Node] = set()
        self.maskish: set[Node] = set()
        self._raw: set[Node] = set()  # activations computed from float model inputs only (no module)
        for node in graph.nodes:
            self._classify(node)

    def _classify(self, node: Node) -> None:
        m = self.meta.get(node)
        carries = m is not None and (m.is_tensor or m.is_tensor_seq)
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            if m is not None and m.is_tensor and (not m.is_float or m.extreme):
                self.maskish.add(node)
            elif carries:
                self.act.add(node)
                self._raw.add(node)
        elif node.op == "get_attr":
            if m is not None and m.extreme:
                self.maskish.add(node)
        elif node.op == "call_module":
            self.act.add(node)
        elif node.op in ("call_function", "call_method") and carries:
            if self._builds_mask(node):
                self.maskish.add(node)
            elif any(a in self.act for a in inputs):
                self.act.add(node)
                if all(a in self._raw for a in inputs if a in self.act):
                    self._raw.add(node)
            elif any(a in self.maskish for a in inputs) or (m is not None and m.extreme):
                self.maskish.add(node)

    def real(self, value: Any) -> bool:
        """Tell whether ``value`` is an activation the model computed (attention scores), not an input."""
        return isinstance(value, Node) and value in self.act and value not in self._raw

    def _large(self, value: Any) -> bool:
        if isinstance(value, Node):
            m = self.meta.get(value)
            return value in self.maskish or (m is not None and m.extreme)
        return is_mask_constant(value)

    def _is_bool(self, value: Any) -> bool:
        m = self.meta.get(value) if isinstance(value, Node) else None
        return m is not None and m.dtype == torch.bool

    def _builds_mask(self, node: Node) -> bool:
        target, args = _target(node), node.args
        if target in _WHERE and len(args) == 3:
            cond, values = args[0], args[1:]
            return (
                self._is_bool(cond)
                and not any(self.real(v) for v in values)
                and any(self._large(v) for v in values)
            )
        if target in _MASKED_FILL:
            fill = args[2] if len(args) > 2 else node.kwargs.get("value")
            return bool(args) and not self.real(args[0]) and self._large(fill)
        if target in _MUL and len(args) == 2:
            a, b = args
            return (is_mask_constant(a) and not self.real(b)) or (is_mask_constant(b) and not self.real(a))
        if target in _FULL:
            fill = node.kwargs.get("fill_value", args[-1] if args else None)
            return is_mask_constant(fill)
        return False
