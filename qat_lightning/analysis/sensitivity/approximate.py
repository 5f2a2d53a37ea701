"""Approximate sensitivity: first-order Taylor estimate from one forward and a few backward passes.

Enabling quant node ``i`` adds noise ``d_i = q(x_i) - x_i`` at its input ``x_i`` (computed exactly
with the node's scale and dtype). To first order the model output moves by ``J_i d_i``, with ``J_i``
the Jacobian of the output with respect to ``x_i`` at the float point. The exact method measures the
output error by running the model; this method estimates ``||J_i d_i||^2`` for *all* nodes at once:

1. one float forward; a hook on every quant node records ``x_i`` (as a tensor that requires grad) and
   ``d_i``;
2. for each model output ``y`` and each of ``num_probes`` Rademacher vectors ``u`` (entries ±1), one
   backward of ``<u, y>`` gives ``g_i = J_i^T u`` for every node; ``<g_i, d_i> = <u, J_i d_i>`` and
   ``E[<u, J_i d_i>^2] = ||J_i d_i||^2`` (Hutchinson). The products are taken per block and their
   squares summed, which lowers the variance by the number of blocks: per sample for activations
   (samples are independent; a coherent error such as clipping stays whole within a sample), per
   output channel for weights (per-channel rounding errors are independent across channels, so the
   cross terms this drops average to zero). A row with several nodes (a gemm's input and output
   nodes) adds their products before squaring;
3. the estimated squared error ``E`` is mapped to the table's metric over the ``n`` output elements:
   ``L1 ≈ sqrt(2/pi) * sqrt(E/n)`` (Gaussian error), ``MSE ≈ E/n``, ``1-COSINE ≈ E / (2 |y|^2)``,
   ``-SQNR ≈ -10 log10(|y|^2 / E)``; for ATOL, KL and custom metrics the value is the estimated RMS
   error ``sqrt(E/n)`` (same ranking, not the metric's scale).

Cost: one forward plus ``outputs × num_probes`` backward passes, independent of the number of ops.
It ignores second-order effects (saturation, large clipping errors after nonlinearities), so use it to
rank and the exact method to confirm.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qat_lightning.analysis.compare.metrics import Metric, error_value
from qat_lightning.analysis.inputs import ModelInputs, batch_size_of, call_model, flatten_outputs
from qat_lightning.analysis.sensitivity.exact import SensitivityTarget
from qat_lightning.analysis.state import analysis_mode
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, fake_quant_disabled

__all__ = ["approximate_sensitivity", "estimate_to_metric"]


def estimate_to_metric(metric: Metric, sq_error: float, y: Tensor) -> float:
    """Map an estimated squared output error to the table's error value (module docstring, step 3)."""
    n = max(y.numel(), 1)
    name = metric.name.upper() if metric.builtin else ""
    if name == "L1":
        return math.sqrt(2.0 / math.pi) * math.sqrt(sq_error / n)
    if name == "MSE":
        return sq_error / n
    energy = float(y.detach().to(torch.float64).square().sum())
    if name == "COSINE":
        return error_value(metric, 1.0 - (sq_error / (2.0 * energy) if energy > 0 else 1.0))
    if name == "SQNR":
        if sq_error <= 0:
            return error_value(metric, math.inf)
        return error_value(metric, 10.0 * math.log10(energy / sq_error) if energy > 0 else -math.inf)
    return math.sqrt(sq_error / n)


def _noise(node: FakeQuantize, x: Tensor) -> Tensor:
    saved = node.state
    node.state = FakeQuantState.VALIDATION
    try:
        with torch.no_grad():
            q = node.forward(x.detach())
            return q.sub_(x) if q is not x else torch.zeros_like(x)
    finally:
        node.state = saved


def _block_dots(g: Tensor, d: Tensor, split: int | None) -> Tensor:
    """``<g, d>`` per block along dim ``split`` (one dot for ``None``), as float64."""
    if split is None:
        return torch.dot(g.reshape(-1), d.reshape(-1)).double().reshape(1)
    if split:
        g, d = g.movedim(split, 0), d.movedim(split, 0)
    n = g.shape[0]
    return torch.linalg.vecdot(g.reshape(n, -1), d.reshape(n, -1)).double()


def approximate_sensitivity(
    model: nn.Module,
    inputs: ModelInputs,
    metric: Metric,
    targets: Sequence[SensitivityTarget],
    num_probes: int = 1,
    seed: int = 0,
) -> dict[SensitivityTarget, dict[str, float]]:
    """Estimate every target's sensitivity (see the module docstring).

    Returns:
        ``{target: {output name: estimated error value}}``, the same form as the exact method.

    Raises:
        ValueError: for ``num_probes < 1``.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    captured: dict[int, list[tuple[Tensor, Tensor, int | None]]] = defaultdict(list)
    batch = batch_size_of(inputs)

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return output
        t = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
        if module.ch_axis is not None and t.dim() >= 1:
            split = module.ch_axis % t.dim()  # weights: one block per output channel
        elif t.dim() >= 1 and t.shape[0] == batch:
            split = 0  # activations: one block per sample
        else:
            split = None
        captured[id(module)].append((t, _noise(module, x), split))
        return t

    nodes = {id(n): n for t in targets for n in t.nodes}
    handles = [n.register_forward_hook(hook) for n in nodes.values()]
    generator = torch.Generator().manual_seed(seed)
    results: dict[SensitivityTarget, dict[str, float]] = {t: {} for t in targets}
    try:
        with analysis_mode(model), fake_quant_disabled(model), torch.enable_grad():
            outputs = flatten_outputs(call_model(model, inputs))
    finally:
        for h in handles:
            h.remove()
    flat = [(k, t, d, sp) for k, items in captured.items() for (t, d, sp) in items]
    leaves = [t for _, t, _, _ in flat]
    for out_name, y in outputs:
        if not y.is_floating_point() or not y.requires_grad:
            for target in targets:
                results[target][out_name] = 0.0
            continue
        sq = {t: 0.0 for t in targets}
        for _ in range(num_probes):
            u = torch.randint(0, 2, y.shape, generator=generator).to(y.device, y.dtype).mul_(2).sub_(1)
            grads = torch.autograd.grad((u * y).sum(), leaves, retain_graph=True, allow_unused=True)
            contrib: dict[int, list[Tensor]] = defaultdict(list)
            for (key, _t, d, split), g in zip(flat, grads, strict=True):
                if g is None:
                    continue
                contrib[key].append(_block_dots(g.detach(), d, split))
            for target in targets:
                parts = [p for n in target.nodes for p in contrib.get(id(n), [])]
                if not parts:
                    continue
                if all(p.shape == parts[0].shape for p in parts):
                    total = torch.stack(parts).sum(0)
                else:
                    total = sum(p.sum() for p in parts).reshape(1)
                sq[target] += float(total.square().sum())
        for target in targets:
            results[target][out_name] = estimate_to_metric(metric, sq[target] / num_probes, y)
    return results
