"""Precision ratios and the chip cost estimate of a prepared network (the summary's columns)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["quant_stats"]


def quant_stats(model: torch.nn.Module, chip: str) -> tuple[float, float, float | None]:
    """Return ``(int16 ratio, fp16 ratio, estimated cost relative to all-int8)`` of a prepared network.

    The ratios are shares of quantized ops that compute with int16 (fp16) anywhere: an explicitly
    quantized input, the weight or the output (a ``float32`` input node means "as produced" and does not
    count). An op can count in both (a j6p gemm with int16 inputs and an fp16 output). Cost:
    ``chips.op_cost`` of every op with those dtypes (an input left as produced takes its producer's
    output dtype), divided by the same ops' MACs (= the all-int8 cost, every factor 1).
    """
    from qat_lightning.chips import get_chip, op_cost
    from qat_lightning.quant.ops import OpKind, iter_quant_ops, quant_nodes_of
    from qat_lightning.quant.qconfig.templates import precision_rank

    spec = get_chip(chip)
    ops = list(iter_quant_ops(model))
    outputs: dict[str, Any] = {}
    for name, op in ops:
        node = quant_nodes_of(op).get("output")
        outputs[name] = None if node is None else node.dtype
    total = reference = 0.0
    counts = {"qint16": 0, "float16": 0}
    for name, op in ops:
        info = op.op_info
        nodes = quant_nodes_of(op)
        inputs, own = [], []
        for i, producer in enumerate(info.input_producers or (None,)):
            node = nodes.get(f"input.{i}")
            dtype = node.dtype if node is not None and not node.dtype.is_float32 else None
            if dtype is not None:
                own.append(dtype)
            inputs.append(dtype if dtype is not None else outputs.get(producer) if producer else None)
        weight = nodes.get("weight")
        output = outputs.get(name)
        used = {d.name for d in (*own, output, None if weight is None else weight.dtype) if d is not None}
        for key in counts:
            counts[key] += key in used
        gemm = info.kind == OpKind.GEMM
        if gemm and info.is_matmul:
            first, second = inputs[0], inputs[1] if len(inputs) > 1 else inputs[0]
        else:
            known = [d for d in inputs if d is not None]
            first = max(known, key=precision_rank) if known else None
            second = None if weight is None else weight.dtype
        total += op_cost(info.flops, first, second, output, spec, gemm)
        reference += info.flops
    n = max(len(ops), 1)
    cost = total / reference if reference else None
    return counts["qint16"] / n, counts["float16"] / n, cost
