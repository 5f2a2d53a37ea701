"""Names of a model's output tensors, shared by the analysis reports and the ONNX export's graph outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["flatten_outputs", "graph_output_name"]


def flatten_outputs(output: Any) -> list[tuple[str, Tensor]]:
    """Name every tensor of a model output like the seed (``0``, ``0-0``, ``0-1``, dict keys).

    The graph outputs of an export carry these names, so a check can pair them with the model's outputs.
    """
    found: list[tuple[str, Tensor]] = []

    def walk(obj: Any, path: tuple[str, ...]) -> None:
        if isinstance(obj, Tensor):
            found.append(("-".join(path), obj))
        elif isinstance(obj, (tuple, list)):
            for i, item in enumerate(obj):
                walk(item, (*path, str(i)))
        elif isinstance(obj, Mapping):
            for key, item in obj.items():
                walk(item, (*path, str(key)))

    if isinstance(output, Mapping):
        for key, item in output.items():
            walk(item, (str(key),))
    else:
        walk(output, ("0",))
    return found


def graph_output_name(name: str) -> str:
    """Return the ONNX graph output name of output ``name`` (``0`` -> ``output_0``: no bare numbers)."""
    return f"output_{name}" if name[:1].isdigit() else name
