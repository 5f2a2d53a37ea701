"""The encodings file written beside an exported model: one entry per quant point.

``<model>.encodings.json`` holds ``{"format": 1, "opset": 21, "points": [...]}``; each point has
``node`` (the quant node's module path), ``op_name`` and ``role`` (the per-layer table's names),
``dtype``, ``scale``, ``zero_point``, ``axis``, ``fixed`` and ``onnx`` (a list of ``{"tensor",
"quantized_tensor", "constant"}``, one per place the node appears in the graph; empty when the node was
not reached by the example inputs, was reached only while its switch was off, or for float32 points which
have no ONNX node). ``tensor`` is the float32 tensor the consumers read (a ``DequantizeLinear`` output, for
a float16 point the second ``Cast``'s output); ``quantized_tensor`` the integer tensor, for a float16 point
the float16 one (the first ``Cast``'s output, or the float16 weight initializer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qat_lightning.quant.export.points import QuantPoint
from qat_lightning.quant.export.qdq_graph import QdqNode

__all__ = [
    "ENCODINGS_FORMAT",
    "QuantEncoding",
    "encodings_path",
    "build_encodings",
    "read_encodings",
    "encodings_json",
]

ENCODINGS_FORMAT = 1


@dataclass(frozen=True)
class QuantEncoding:
    """One quant point as deployed (see the module docstring for the fields)."""

    node: str
    op_name: str
    role: str
    dtype: str
    scale: tuple[float, ...]
    zero_point: int
    axis: int | None
    fixed: bool
    onnx_tensors: tuple[str, ...] = ()
    onnx_quantized_tensors: tuple[str, ...] = ()
    constant: bool = False


def encodings_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.encodings.json``."""
    return Path(onnx_path).with_suffix(".encodings.json")


def build_encodings(points: Sequence[QuantPoint], placed: Sequence[QdqNode]) -> list[QuantEncoding]:
    """Join the model's quant points with where each landed in the graph."""
    by_point: dict[str, list[QdqNode]] = {}
    for q in placed:
        by_point.setdefault(q.point, []).append(q)
    out = []
    for p in points:
        where = by_point.get(p.node, [])
        out.append(
            QuantEncoding(
                node=p.node,
                op_name=p.op_name,
                role=p.role,
                dtype=p.dtype,
                scale=p.scale,
                zero_point=0,
                axis=p.axis,
                fixed=p.fixed,
                onnx_tensors=tuple(q.tensor for q in where),
                onnx_quantized_tensors=tuple(q.quantized_tensor for q in where),
                constant=bool(where) and all(q.constant for q in where),
            )
        )
    return out


def _entry(e: QuantEncoding) -> dict[str, Any]:
    return {
        "node": e.node,
        "op_name": e.op_name,
        "role": e.role,
        "dtype": e.dtype,
        "scale": list(e.scale) if e.axis is not None else (e.scale[0] if e.scale else None),
        "zero_point": e.zero_point,
        "axis": e.axis,
        "fixed": e.fixed,
        "onnx": [
            {"tensor": t, "quantized_tensor": q, "constant": e.constant}
            for t, q in zip(e.onnx_tensors, e.onnx_quantized_tensors, strict=True)
        ],
    }


def encodings_json(encodings: Sequence[QuantEncoding], opset: int) -> str:
    """Render the encodings file's text."""
    doc = {"format": ENCODINGS_FORMAT, "opset": opset, "points": [_entry(e) for e in encodings]}
    return json.dumps(doc, indent=1) + "\n"


def read_encodings(path: str | os.PathLike[str]) -> list[QuantEncoding]:
    """Read an encodings file (the ``.encodings.json`` itself or the ``.onnx`` it belongs to)."""
    p = Path(path)
    if p.suffix == ".onnx":
        p = encodings_path(p)
    doc = json.loads(p.read_text())
    if doc.get("format") != ENCODINGS_FORMAT:
        raise ValueError(f"{p}: unknown encodings format {doc.get('format')!r}; allowed: {ENCODINGS_FORMAT}")
    out = []
    for d in doc["points"]:
        scale = d["scale"]
        scale_t = () if scale is None else tuple(scale) if isinstance(scale, list) else (float(scale),)
        onnx_entries = d.get("onnx", [])
        out.append(
            QuantEncoding(
                node=d["node"],
                op_name=d["op_name"],
                role=d["role"],
                dtype=d["dtype"],
                scale=scale_t,
                zero_point=int(d["zero_point"]),
                axis=d["axis"],
                fixed=bool(d["fixed"]),
                onnx_tensors=tuple(o["tensor"] for o in onnx_entries),
                onnx_quantized_tensors=tuple(o["quantized_tensor"] for o in onnx_entries),
                constant=bool(onnx_entries) and all(o["constant"] for o in onnx_entries),
            )
        )
    return out
