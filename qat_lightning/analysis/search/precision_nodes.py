"""Which quant nodes a sensitivity row stands for, and what a dtype assignment costs on a chip.

Raising a row in place mirrors what :class:`~qat_lightning.quant.qconfig.templates.SensitivityTemplate` does
to the qconfig, so a probe measures what the produced setter will prepare:

* ``activation`` row: the op's output node (when below ``high``) and, for a gemm, every input node whose
  *effective* dtype is below ``high`` (an input node in ``float32`` passes its producer's output through:
  its effective dtype is the producer's output dtype);
* ``weight`` row: the gemm's weight node (when below ``high``).

Costs use :func:`qat_lightning.chips.op_cost` with each op's effective dtypes; with no chip the
``j6m`` prices are used (documented in the plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from qat_lightning.chips import ChipSpec, get_chip, op_cost
from qat_lightning.quant.dtypes import QuantDtype, float32
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import OpInfo, OpKind, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.qconfig.templates import precision_rank

__all__ = ["OpNodes", "collect_ops", "raise_assignment", "assignment_cost", "DEFAULT_COST_CHIP"]

DEFAULT_COST_CHIP = "j6m"


@dataclass(frozen=True)
class OpNodes:
    """One op: its info and quant nodes (``inputs`` in input order)."""

    info: OpInfo
    inputs: tuple[FakeQuantize, ...]
    weight: FakeQuantize | None
    output: FakeQuantize | None


def collect_ops(model: nn.Module) -> dict[str, OpNodes]:
    """Every op of a prepared model by name, in graph order."""
    found: dict[str, OpNodes] = {}
    for name, op in iter_quant_ops(model):
        nodes = quant_nodes_of(op)
        inputs = tuple(n for k, n in nodes.items() if k.startswith("input."))
        found[name] = OpNodes(op.op_info, inputs, nodes.get("weight"), nodes.get("output"))
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

    With a chip that forbids double int16 on a gemm, a weight row whose op's activation input ends up in
    qint16 stays low (what ``QconfigSetter(on_violation="downgrade")`` does); each such case is noted.

    Returns:
        ``(node → dtype for every changed node, notes)``.
    """
    dtypes: dict[FakeQuantize, QuantDtype] = dict(base or {})
    notes: list[str] = []
    rank = precision_rank(high)
    for name, kind in rows:
        op = ops.get(name)
        if op is None:
            notes.append(f"{name}: not an op of this model (skipped)")
            continue
        if kind == "weight":
            if op.weight is not None and precision_rank(_current(op.weight, dtypes)) < rank:
                dtypes[op.weight] = high
            continue
        out = op.output
        if (
            out is not None
            and not _current(out, dtypes).is_float32
            and precision_rank(_current(out, dtypes)) < rank
        ):
            dtypes[out] = high
        if op.info.kind is OpKind.GEMM:
            for node, eff in zip(op.inputs, effective_inputs(op, ops, dtypes), strict=True):
                if eff is None or precision_rank(eff) < rank:
                    dtypes[node] = high
    if chip is not None and not chip.gemm_double_int16:
        for name, op in ops.items():
            if op.info.kind is not OpKind.GEMM or op.weight is None or op.info.is_matmul:
                continue
            acts = effective_inputs(op, ops, dtypes)
            if (
                any(a is not None and a.name == "qint16" for a in acts)
                and _current(op.weight, dtypes).name == "qint16"
            ):
                if dtypes.get(op.weight) is not None and op.weight.dtype.name != "qint16":
                    dtypes.pop(op.weight)
                    notes.append(
                        f"{name}: {chip.name} has no double int16 gemm: weight kept {op.weight.dtype}"
                    )
    return dtypes, notes


def assignment_cost(
    ops: Mapping[str, OpNodes], dtypes: Mapping[FakeQuantize, QuantDtype], chip: str | ChipSpec | None
) -> float:
    """Total relative cost of the model with the pending ``dtypes`` (``chips.op_cost`` per op)."""
    spec = get_chip(chip if chip is not None else DEFAULT_COST_CHIP)
    total = 0.0
    for op in ops.values():
        acts = [a for a in effective_inputs(op, ops, dtypes) if a is not None and not a.is_float32]
        out = _current(op.output, dtypes) if op.output is not None else None
        out = None if out is not None and out.is_float32 else out
        weight = _current(op.weight, dtypes) if op.weight is not None else None
        weight = None if weight is not None and weight.is_float32 else weight
        is_gemm = op.info.kind is OpKind.GEMM
        if is_gemm and op.info.is_matmul:
            first = acts[0] if acts else None
            second = acts[1] if len(acts) > 1 else first
            total += op_cost(op.info.flops, first, second, out, spec, True)
        else:
            act = max(acts, key=precision_rank) if acts else None
            total += op_cost(op.info.flops, act, weight if is_gemm else None, out, spec, is_gemm)
    return total
