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
