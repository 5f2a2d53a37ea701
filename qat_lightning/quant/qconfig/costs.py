"""What a qconfig assignment costs on a chip: per-op and whole-model relative cost.

The factors and :func:`~qat_lightning.chips.op_cost` are chip data (``qat_lightning/chips.py``); this module
applies them to a :class:`~qat_lightning.quant.qconfig.setter.QconfigAssignment`, using each gemm's effective
input dtypes. (It lived in ``chips.py`` until the issue-16 layout; moving it here keeps ``chips.py`` free of
any quant import.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qat_lightning.chips import ChipSpec, dtype_factor, get_chip, op_cost
from qat_lightning.quant.ops import OpInfo
from qat_lightning.quant.qconfig.setter import QconfigAssignment

__all__ = ["model_cost", "op_costs"]


def _widest(dtypes: Iterable[Any], chip: ChipSpec) -> Any:
    known = [d for d in dtypes if d is not None]
    return max(known, key=lambda d: dtype_factor(d, chip)) if known else None


def op_costs(ops: Iterable[OpInfo], assignment: QconfigAssignment, chip: str | ChipSpec) -> dict[str, float]:
    """Per-op cost of ``assignment`` on ``chip``, using each gemm's effective input dtypes.

    Args:
        ops: the ops (``OpInfo``) in graph order.
        assignment: a ``QconfigAssignment`` (its ``qconfigs`` and ``input_dtypes(op)``).
        chip: chip name or spec.
    """
    spec = get_chip(chip)
    qconfigs: Mapping[str, Any] = assignment.qconfigs
    costs: dict[str, float] = {}
    for op in ops:
        qconfig = qconfigs[op.name]
        inputs = assignment.input_dtypes(op)
        is_gemm = getattr(op.kind, "value", op.kind) == "gemm"
        if is_gemm and op.is_matmul:
            first = inputs[0] if inputs else None
            second = inputs[1] if len(inputs) > 1 else first
            costs[op.name] = op_cost(op.flops, first, second, qconfig.output_dtype, spec, True)
        elif is_gemm:
            act = _widest(inputs, spec)
            costs[op.name] = op_cost(op.flops, act, qconfig.weight_dtype, qconfig.output_dtype, spec, True)
        else:
            act = _widest(inputs, spec)
            costs[op.name] = op_cost(op.flops, act, None, qconfig.output_dtype, spec, False)
    return costs


def model_cost(ops: Iterable[OpInfo], assignment: QconfigAssignment, chip: str | ChipSpec) -> float:
    """Total relative cost of ``assignment`` on ``chip`` (the sum of :func:`op_costs`)."""
    return float(sum(op_costs(ops, assignment, chip).values()))
