"""The float32 noise floor of each quant point: fake quant in float32 vs the same model in float64.

onnxruntime and torch both compute in float32, in different accumulation orders. Where a value sits near
a rounding boundary, either may land one step off, and downstream ops sum several such one-step flips:
for an int16 point (steps 256x finer than int8) this routinely reaches 2-3 steps without anything being
wrong. The honest yardstick for "a real mismatch" is therefore how far the fake-quant model moves from
itself when only the float arithmetic changes: the same model run in float64. Per quant point and call,
:func:`float32_noise_steps` measures ``max |fq32 - fq64| / scale``; ``first_export_mismatch`` allows twice
that (torch and onnxruntime may each sit that far from the exact result, on opposite sides) on top of its
``max_steps``. A wrong scale moves a point by far more (a 1.5x scale error is about a
third of the range: tens of int8 steps, thousands of int16 steps), so it is still caught.

A second allowance (:func:`fp16_fed_tensors`, :func:`fp16_ulp`) is for points fed by a float16 cast: the
value before the cast is float32 on both sides, and where it sits within float32 noise of a float16
rounding boundary, torch and onnxruntime round it to neighbouring float16 values. The point then differs by
one float16 ulp of the upstream value, which the float64 twin does not measure (it rounds to float16 too,
and one batch rarely shows the flip); ``first_export_mismatch`` allows one float16 ulp of the point's
``|max|``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.analysis.inputs import InputFn, iter_batches, map_tensors
from qat_lightning.quant import FakeQuantState, fake_quant_state, iter_fake_quantize
from qat_lightning.quant.export.restore import eval_restoring

__all__ = ["float32_noise_steps", "fp16_fed_tensors", "fp16_ulp", "record_outputs"]


def record_outputs(model: nn.Module, wanted: set[str]) -> tuple[dict[str, list[Tensor]], list[Any]]:
    """Record the outputs of the quant nodes in ``wanted`` (``{node: [float64 CPU output per call]}``)."""
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for name, node in iter_fake_quantize(model):
        if name in wanted:

            def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                seen.setdefault(name, []).append(out.detach().double().cpu())

            handles.append(node.register_forward_hook(hook))
    return seen, handles


def _run(model: nn.Module, inputs: Any, to_double: bool) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def move(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.double() if to_double and t.is_floating_point() else t

    on_device = map_tensors(inputs, move)
    model(**on_device) if isinstance(on_device, dict) else model(*on_device)


def float32_noise_steps(
    model: nn.Module,
    dataloader: Iterable[Any],
    nodes: set[str],
    *,
    input_fn: InputFn | None = None,
    num_batches: int | None = 1,
) -> dict[str, list[float]]:
    """Return ``{node: [max |fq32 - fq64| / scale per call]}`` for the per-tensor quant nodes in ``nodes``.

    The model (VALIDATION, eval) is run as it is and as a float64 copy on the same batches; ``model``
    itself is left as it was. A model that cannot run in float64 gives ``{}`` (no noise allowance: the
    strict one-step rule applies).
    """
    scales = {
        name: float(n.scale.detach().double().reshape(-1)[0])
        for name, n in iter_fake_quantize(model)
        if name in nodes and n.ch_axis is None and n.dtype.is_integer
    }
    twin = copy.deepcopy(model).double().eval()
    noise: dict[str, list[float]] = {}
    seen32, h32 = record_outputs(model, set(scales))
    seen64, h64 = record_outputs(twin, set(scales))
    try:
        with (
            eval_restoring(model),
            fake_quant_state(model, FakeQuantState.VALIDATION),
            fake_quant_state(twin, FakeQuantState.VALIDATION),
            torch.no_grad(),
        ):
            for inputs in iter_batches(dataloader, num_batches, input_fn):
                seen32.clear()
                seen64.clear()
                _run(model, inputs, to_double=False)
                try:
                    _run(twin, inputs, to_double=True)
                except (RuntimeError, TypeError):  # an op without a float64 kernel: no allowance
                    return {}
                for name, calls in seen32.items():
                    twin_calls = seen64.get(name, [])
                    steps = [
                        float((a - b).abs().max()) / scales[name] if a.numel() and a.shape == b.shape else 0.0
                        for a, b in zip(calls, twin_calls, strict=False)
                    ]
                    old = noise.get(name, [])
                    noise[name] = [max(pair) for pair in zip(steps, old, strict=False)] if old else steps
    finally:
        for h in h32 + h64:
            h.remove()
    return noise


def fp16_ulp(value: float) -> float:
    """Return the float16 spacing at ``|value|`` (``2^(e - 10)`` in binade ``2^e``, subnormal ``2^-24``)."""
    v = min(abs(value), 65504.0)
    if v == 0.0 or not math.isfinite(v):
        return 0.0
    return math.ldexp(1.0, max(math.frexp(v)[1] - 1, -14) - 10)


_PASS_THROUGH = {
    "Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Slice", "Gather",
    "GatherElements", "Concat", "Split", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "MaxPool", "Relu",
}  # fmt: skip
"""Ops whose output values are input values: a float16 value stays float16, an ulp stays an ulp."""


def fp16_fed_tensors(path: Path) -> set[str]:
    """Return the dequantized activations whose ``QuantizeLinear`` input comes from a float16 cast.

    Walks back from each ``QuantizeLinear`` input through :data:`_PASS_THROUGH` ops (their data inputs) to a
    ``Cast(float32)`` of a ``Cast(float16)`` output (the export's float16 quant point and fp16 norm steps).
    """
    import onnx
    from onnx import TensorProto

    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node: Any, to: int) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    def fed(name: str, depth: int = 0) -> bool:
        node = producer.get(name)
        if node is None or depth > 64:
            return False
        if cast_to(node, TensorProto.FLOAT):
            source = producer.get(node.input[0])
            return source is not None and cast_to(source, TensorProto.FLOAT16)
        if node.op_type not in _PASS_THROUGH:
            return False
        inputs = node.input if node.op_type == "Concat" else node.input[:1]
        return any(fed(i, depth + 1) for i in inputs if i)

    return {
        n.output[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and (q := producer.get(n.input[0])) is not None
        and q.op_type == "QuantizeLinear"
        and fed(q.input[0])
    }
