"""Which quant nodes a sensitivity row stands for, and what a dtype assignment costs on a chip.

Raising a row in place mirrors what :class:`~qat_lightning.quant.qconfig.templates.SensitivityTemplate` does
to the qconfig, so a probe measures what the produced setter will prepare:

* ``activation`` row: the op's output node (when below ``high``) and, for a gemm, every input node whose
  *effective* dtype is below ``high`` (an input node in ``float32`` passes its producer's output through:
  its effective dtype is the producer's output dtype);
* ``weight`` row: the gemm's weight node (when below ``high``).

Partial quantization: a node in state ``FLOAT`` when the ops are collected (the user left it unquantized)
quantizes nothing in the model under analysis (every probe keeps it FLOAT), so it is never raised, and a
row whose nodes are all FLOAT (:meth:`OpNodes.is_float_row`) is not counted by the search: raising it
would change nothing, while counting it would inflate the plan's rows, ratio and cost. The sensitivity
sweep does not list such rows either.

With a chip, every assignment then goes through the chip's rules with the setter's own rule code
(:func:`apply_chip_rules`), so a probe measures and prices what ``plan.setter`` builds: e.g. on j6e/j6m a
matmul with both inputs raised to qint16 is probed with its second input in qint8.

Costs use :func:`qat_lightning.chips.op_cost` with each op's effective dtypes; with no chip the
``j6m`` prices are used (documented in the plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from qat_lightning.chips import ChipSpec, get_chip, op_cost
from qat_lightning.quant.dtypes import QuantDtype, float32
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState
from qat_lightning.quant.ops import OpInfo, OpKind, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.qconfig.setter import chip_issues
from qat_lightning.quant.qconfig.templates import precision_rank

__all__ = [
    "OpNodes",
    "collect_ops",
    "raise_assignment",
    "apply_chip_rules",
    "assignment_cost",
    "DEFAULT_COST_CHIP",
]

DEFAULT_COST_CHIP = "j6m"


@dataclass(frozen=True)
class OpNodes:
    """One op: its info and quant nodes (``inputs`` in input order).

    Attributes:
        info: the op's info.
        inputs: its input nodes, in input order.
        weight: its weight node (gemm ops).
        output: its output node.
        disabled: its nodes that were in FLOAT when collected (partial quantization: never raised).
    """

    info: OpInfo
    inputs: tuple[FakeQuantize, ...]
    weight: FakeQuantize | None
    output: FakeQuantize | None
    disabled: frozenset[FakeQuantize] = frozenset()

    def row_nodes(self, kind: str) -> tuple[FakeQuantize, ...]:
        """Return the nodes a row of ``kind`` (``activation`` / ``weight``) may raise."""
        if kind == "weight":
            return (self.weight,) if self.weight is not None else ()
        own = (self.output,) if self.output is not None else ()
        return own + (self.inputs if self.info.kind is OpKind.GEMM else ())

    def is_float_row(self, kind: str) -> bool:
        """Whether every node of a row of ``kind`` was left in FLOAT (raising it changes nothing)."""
        nodes = self.row_nodes(kind)
        return bool(nodes) and all(n in self.disabled for n in nodes)


def collect_ops(model: nn.Module) -> dict[str, OpNodes]:
    """Every op of a prepared model by name, in graph order (nodes in FLOAT now recorded as disabled)."""
    found: dict[str, OpNodes] = {}
    for name, op in iter_quant_ops(model):
        nodes = quant_nodes_of(op)
        inputs = tuple(n for k, n in nodes.items() if k.startswith("input."))
        off = frozenset(n for n in nodes.values() if n.state is FakeQuantState.FLOAT)
        found[name] = OpNodes(op.op_info, inputs, nodes.get("weight"), nodes.get("output"), off)
    return found


def _current(node: FakeQuantize, dtypes: Mapping[FakeQuantize, QuantDtype]) -> QuantDtype:
    return dtypes.get(node, node.dtype)


def effective_inputs(
    op: OpNodes, ops: Mapping[str, OpNodes], dtypes: Mapping[FakeQuantize, QuantDtype]
) -> list[QuantDtype | None]:
    """Effective dtype of each input node of ``op`` under the pending ``dtypes`` changes."""
    result: list[QuantDtype | None] = []
    for i, node in enumerate(op.inputs):
        own = _current(node, dtypes)
        if own != float32:
            result.append(own)
            continue
        producers = op.info.input_producers
        producer = ops.get(producers[i]) if i < len(producers) and producers[i] else None
        out = producer.output if producer is not None else None
        result.append(_current(out, dtypes) if out is not None else None)
    return result


def raise_assignment(
    rows: list[tuple[str, str]],
    ops: Mapping[str, OpNodes],
    high: QuantDtype,
    base: Mapping[FakeQuantize, QuantDtype] | None = None,
    chip: ChipSpec | None = None,
) -> tuple[dict[FakeQuantize, QuantDtype], list[str]]:
    """Compute node dtypes after raising ``rows`` (``(op_name, sensitive_type)``) to ``high`` over ``base``.

    As :class:`~qat_lightning.quant.qconfig.templates.SensitivityTemplate` does, outputs and weights are
    raised first, then gemm inputs (so the result does not depend on the row order). With a chip, its
    rules follow (:func:`apply_chip_rules`, what ``QconfigSetter(on_violation="downgrade")`` does), e.g.
    a weight row whose gemm's activation ends up in qint16 stays low on a chip without double int16.

    Nodes that were in FLOAT when ``ops`` were collected are never raised (module docstring).

    Returns:
        ``(node → dtype for every changed node, notes)``; the notes list the chip's downgrades.
    """
    dtypes: dict[FakeQuantize, QuantDtype] = dict(base or {})
    notes: list[str] = []
    rank = precision_rank(high)
    selected: list[OpNodes] = []
    for name, kind in rows:
        op = ops.get(name)
        if op is None:
            notes.append(f"{name}: not an op of this model (skipped)")
            continue
        node = op.weight if kind == "weight" else op.output
        if node is not None and node not in op.disabled and precision_rank(_current(node, dtypes)) < rank:
            dtypes[node] = high
        if kind != "weight" and op.info.kind is OpKind.GEMM:
            selected.append(op)
    for op in selected:
        for node, eff in zip(op.inputs, effective_inputs(op, ops, dtypes), strict=True):
            if node not in op.disabled and (eff is None or precision_rank(eff) < rank):
                dtypes[node] = high
    if chip is not None:
        notes.extend(apply_chip_rules(ops, dtypes, chip))
    return dtypes, notes


def _point(op: OpNodes, point: str) -> FakeQuantize | None:
    if point in ("weight", "output"):
        return op.weight if point == "weight" else op.output
    index = int(point.split(".")[1])
    return op.inputs[index] if index < len(op.inputs) else None


def apply_chip_rules(
    ops: Mapping[str, OpNodes], dtypes: dict[FakeQuantize, QuantDtype], chip: str | ChipSpec
) -> list[str]:
    """Apply the chip's downgrades to the pending ``dtypes`` in place, as ``plan.setter`` applies them.

    The same rule code as ``QconfigSetter(on_violation="downgrade")``
    (:func:`~qat_lightning.quant.qconfig.setter.chip_issues` on each op's effective dtypes, in graph order,
    so a producer is fixed before its consumers read its output): a float gemm input becomes qint16, a
    matmul's second input (a gemm's weight) qint16 -> qint8 where the chip has no double int16, an output
    the chip cannot produce is changed. An entry that ends at the node's own dtype is dropped.

    Returns:
        one note per downgrade (``op: point before -> after (rule)``).
    """
    spec = get_chip(chip)
    notes: list[str] = []
    for op in ops.values():
        weight = _current(op.weight, dtypes) if op.weight is not None else None
        output = _current(op.output, dtypes) if op.output is not None else None
        issues = chip_issues(op.info, effective_inputs(op, ops, dtypes), weight, output, spec)
        for issue in issues:
            node = _point(op, issue.point)
            if node is None:
                continue
            if issue.after == node.dtype:
                dtypes.pop(node, None)
            else:
                dtypes[node] = issue.after
            double = "" if spec.gemm_double_int16 or issue.after.name != "qint8" else "no double int16 gemm: "
            notes.append(f"{double}{issue.line()}")
    return notes


def assignment_cost(
    ops: Mapping[str, OpNodes], dtypes: Mapping[FakeQuantize, QuantDtype], chip: str | ChipSpec | None
) -> float:
    """Total relative cost of the model with the pending ``dtypes`` (``chips.op_cost`` per op)."""
    spec = get_chip(chip if chip is not None else DEFAULT_COST_CHIP)
    total = 0.0
    for op in ops.values():
        effective = [None if a is None or a.is_float32 else a for a in effective_inputs(op, ops, dtypes)]
        acts = [a for a in effective if a is not None]
        out = _current(op.output, dtypes) if op.output is not None else None
        out = None if out is not None and out.is_float32 else out
        weight = _current(op.weight, dtypes) if op.weight is not None else None
        weight = None if weight is not None and weight.is_float32 else weight
        is_gemm = op.info.kind is OpKind.GEMM
        if is_gemm and op.info.is_matmul:
            first = effective[0] if effective else None
            second = effective[1] if len(effective) > 1 else first
            total += op_cost(op.info.flops, first, second, out, spec, True)
        else:
            act = max(acts, key=precision_rank) if acts else None
            total += op_cost(op.info.flops, act, weight if is_gemm else None, out, spec, is_gemm)
    return total
