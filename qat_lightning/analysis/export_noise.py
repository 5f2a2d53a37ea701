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
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.analysis.inputs import InputFn, iter_batches, map_tensors
from qat_lightning.quant import FakeQuantState, fake_quant_state, iter_fake_quantize

__all__ = ["float32_noise_steps", "record_outputs"]


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
    was_training = model.training
    seen32, h32 = record_outputs(model, set(scales))
    seen64, h64 = record_outputs(twin, set(scales))
    try:
        model.eval()
        with (
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
        model.train(was_training)
    return noise
