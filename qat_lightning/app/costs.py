"""Precision ratios and the chip cost estimate of a prepared network (the summary's columns)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["quant_stats"]


def quant_stats(model: torch.nn.Module, chip: str) -> tuple[float, float, float | None]:
    """Return ``(int16 ratio, fp16 ratio, estimated cost relative to all-int8)`` of a prepared network.

    The ratios are the op shares of ``model_check_result.txt``'s dtype summary and TensorBoard's
    ``quant/ratio_<dtype>`` (:func:`~qat_lightning.quant.preparation.model_check.dtype_op_shares`): each op
    counts once, in the dtype it computes in (a gemm: the widest of its effective inputs and weight, an
    input left as produced taking its producer's output dtype; another op: its output dtype; an op prepare
    left float32 without quant points: float32). Cost: ``chips.op_cost`` of every op with the same
    effective dtypes (a gemm priced by its operands, another op by its widest dtype), divided by the same
    ops' MACs (= the all-int8 cost, every factor 1); ops prepare left float32 without quant points
    (``prepare_record.float_ops``) and the gemms they feed are priced as float32.
    """
    from qat_lightning.chips import get_chip, op_cost
    from qat_lightning.quant.ops import OpKind, iter_quant_ops, quant_nodes_of
    from qat_lightning.quant.preparation.model_check import dtype_op_shares, float_input_gemms
    from qat_lightning.quant.qconfig.templates import precision_rank

    spec = get_chip(chip)
    ops = list(iter_quant_ops(model))
    float_gemms = {info.name for info in float_input_gemms(model)}
    outputs: dict[str, Any] = {}
    for name, op in ops:
        node = quant_nodes_of(op).get("output")
        outputs[name] = None if node is None else node.dtype
    total = reference = 0.0
    for name, op in ops:
        info = op.op_info
        nodes = quant_nodes_of(op)
        inputs = []
        for i, producer in enumerate(info.input_producers or (None,)):
            node = nodes.get(f"input.{i}")
            dtype = node.dtype if node is not None and not node.dtype.is_float32 else None
            inputs.append(dtype if dtype is not None else outputs.get(producer) if producer else None)
        weight = nodes.get("weight")
        output = outputs.get(name)
        gemm = info.kind == OpKind.GEMM
        if gemm and info.is_matmul:
            first, second = inputs[0], inputs[1] if len(inputs) > 1 else inputs[0]
        else:
            known = [d for d in inputs if d is not None]
            first = max(known, key=precision_rank) if known else None
            second = None if weight is None else weight.dtype
        if name in float_gemms:  # fed by an op left float32: a float32 gemm
            first = "float32"
        total += op_cost(info.flops, first, second, output, spec, gemm)
        reference += info.flops
    for float_op in getattr(
        getattr(model, "prepare_record", None), "float_ops", ()
    ):  # left float32: priced so
        total += op_cost(float_op.flops, "float32", None, "float32", spec, False)
        reference += float_op.flops
    shares = dtype_op_shares(model)
    cost = total / reference if reference else None
    return shares.get("qint16", 0.0), shares.get("float16", 0.0), cost
