"""What equalization measures: activation ranges at graph nodes, and its consumers' error under fake quant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from qat_lightning.analysis.inputs import ModelInputs
from qat_lightning.ptq.capture import eval_mode
from qat_lightning.quant import QuantDtype, fake_quantize

__all__ = ["probe_error", "record_nodes"]


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the last-dim range of ``act`` nodes' outputs and ``probe`` nodes' args."""

    def __init__(self, gm: fx.GraphModule, act: Sequence[fx.Node], probes: Sequence[fx.Node]) -> None:
        super().__init__(gm)
        self.act = {node: i for i, node in enumerate(act)}
        self.ranges: list[Tensor | None] = [None] * len(act)
        self.probes = set(probes)
        self.args: dict[fx.Node, list[tuple[Any, ...]]] = {node: [] for node in probes}

    def run_node(self, n: fx.Node) -> Any:  # noqa: D102
        if n in self.probes:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.args[n].append(tuple(a.detach() if isinstance(a, Tensor) else a for a in args))
        out = super().run_node(n)
        i = self.act.get(n)
        if i is not None:
            r = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            old = self.ranges[i]
            self.ranges[i] = r if old is None else torch.maximum(old, r)
        return out


def _positional(gm: fx.GraphModule, inputs: ModelInputs) -> tuple[Any, ...]:
    if not isinstance(inputs, dict):
        return inputs
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise ValueError(f"equalize: the model takes no input named {unknown}; its inputs: {names}")
    given = [name for name in names if name in inputs]
    if given != names[: len(given)]:
        raise ValueError(f"equalize: keyword inputs must be the first ones of {names}, got {sorted(inputs)}")
    return tuple(inputs[name] for name in given)


@torch.no_grad()
def record_nodes(
    gm: fx.GraphModule, batches: list[ModelInputs], act: Sequence[fx.Node], probes: Sequence[fx.Node]
) -> tuple[list[Tensor], dict[fx.Node, list[tuple[Any, ...]]]]:
    """Run ``gm`` on every batch: per ``act`` node ``max |x|`` per last-dim channel; per probe its args."""
    rec = _Recorder(gm, act, probes)
    with eval_mode(gm):
        for batch in batches:
            rec.run(*_positional(gm, batch))
    missing = [n.name for n, r in zip(act, rec.ranges, strict=True) if r is None]
    if missing:
        raise ValueError(f"equalize: graph nodes {missing} never ran on the calibration batches")
    return [r for r in rec.ranges if r is not None], rec.args


def _quant(x: Tensor, dtype: QuantDtype, ch_axis: int | None = None) -> Tensor:
    if ch_axis is None:
        amax = x.abs().amax()
    else:
        amax = x.abs().movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1).amax(1)
    return fake_quantize(x, (amax / dtype.qmax).clamp_min(1e-12), dtype, ch_axis)


def _pair(
    gm: fx.GraphModule, node: fx.Node, args: tuple[Any, ...], dtype: QuantDtype
) -> tuple[Tensor, Tensor]:
    """Return the probe op's float output and its output with quantized inputs (and weight)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        x, w = args[0], mod.weight
        if isinstance(mod, nn.Linear):
            return mod(x), torch.nn.functional.linear(_quant(x, dtype), _quant(w, dtype, 0), mod.bias)
        return mod(x), mod._conv_forward(_quant(x, dtype), _quant(w, dtype, 0), mod.bias)
    a, b = args[0], args[1]
    return torch.matmul(a, b), torch.matmul(_quant(a, dtype), _quant(b, dtype))


@torch.no_grad()
def probe_error(
    gm: fx.GraphModule,
    probes: Sequence[fx.Node],
    recorded: dict[fx.Node, list[tuple[Any, ...]]],
    dtype: QuantDtype,
    reference: dict[fx.Node, list[Tensor]] | None = None,
) -> tuple[float, dict[fx.Node, list[Tensor]]]:
    """Sum over the probe ops of ``||q(op) - ref||^2 / ||ref||^2`` on the recorded inputs.

    ``ref`` is ``reference`` (the float outputs before a change, so a change that alters the float
    function is charged for it) or, when ``None``, the op's float output on these inputs. Returns the error
    and the float outputs.
    """
    total, outputs = 0.0, {}
    for node in probes:
        err = ref = 0.0
        outputs[node] = []
        for i, args in enumerate(recorded[node]):
            y, yq = _pair(gm, node, args, dtype)
            outputs[node].append(y)
            target = y if reference is None else reference[node][i]
            err += float((yq - target).double().square().sum())
            ref += float(target.double().square().sum())
        total += err / max(ref, 1e-30)
    return total, outputs
