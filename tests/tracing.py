"""Test helper: what dynamo traces, read from the FX graphs it hands a backend (nothing is compiled)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def traced_ops(fn: Callable[..., Any], *args: Any) -> list[str]:
    """Run ``fn(*args)`` under ``torch.compile(fullgraph=True)``; return the targets of the traced graphs."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return [str(node.target) for gm in graphs for node in gm.graph.nodes]


def saved_for_backward(fn: Callable[..., Any], *args: Any) -> list[torch.dtype]:
    """Dtypes of what the compiled forward of ``fn(*args)`` keeps for backward (inductor's partitioner).

    Runs ``fn(*args).sum().backward()`` once. AOTAutograd splits the traced graph with
    ``min_cut_rematerialization_partition`` (what inductor uses); the backward graph's inputs are the kept
    tensors and the incoming gradients (``tangents_*``).
    """
    from functorch.compile import aot_module_simplified, make_boxed_func, min_cut_rematerialization_partition

    saved: list[torch.dtype] = []

    def bw_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        for node in gm.graph.find_nodes(op="placeholder"):
            if not node.name.startswith("tangents") and isinstance(node.meta.get("val"), torch.Tensor):
                saved.append(node.meta["val"].dtype)
        return make_boxed_func(gm.forward)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=lambda g, _: make_boxed_func(g.forward),
            bw_compiler=bw_compiler,
            partition_fn=min_cut_rematerialization_partition,
        )

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    out.sum().backward()
    return saved
