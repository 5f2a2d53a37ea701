"""Turn the traced graph's ``qat_lightning`` placeholders into standard ONNX nodes.

``QuantDequant`` (integer points):

* activation: ``QuantizeLinear(x, scale, zero_point)`` → ``DequantizeLinear`` (the zero point's type,
  ``int8`` or ``int16``, sets the integer type; opset 21 allows both);
* constant weight (after constant folding, e.g. conv + BN folded): the integer codes are computed here
  (``clamp(round(w * (1 / scale)))``, as the node computes them) and stored as an ``int8`` / ``int16``
  initializer followed by ``DequantizeLinear``: the file holds no float copy of the weight.

``FakeCast`` (float16 points): ``Clip(±65504)`` → ``Cast(float16)`` → ``Cast(float32)`` for an activation,
a float16 initializer (``clip(w).astype(float16)``) → ``Cast(float32)`` for a constant weight.

Afterwards unused initializers and constants are dropped and the default opset is raised to the target.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qat_lightning.quant.export.norms import FP16_MAX
from qat_lightning.quant.export.points import CUSTOM_DOMAIN

__all__ = ["QdqNode", "rewrite_quant_points"]

_INT_TYPES = {(-128, 127): (TensorProto.INT8, np.int8), (-32768, 32767): (TensorProto.INT16, np.int16)}


@dataclass(frozen=True)
class QdqNode:
    """Where one quant point ended up in the ONNX graph.

    Attributes:
        point: the quant node's module path.
        tensor: name of the dequantized (float) tensor its consumers read.
        quantized_tensor: name of the integer tensor (a ``QuantizeLinear`` output or a weight initializer),
            for a float16 point the float16 tensor (the first ``Cast``'s output or a weight initializer).
        constant: whether the input was a constant (weight stored as integers / float16).
        cast: whether the point is a float16 ``Cast`` pair (else a QDQ pair).
    """

    point: str
    tensor: str
    quantized_tensor: str
    constant: bool
    cast: bool = False


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and of ``Constant`` node outputs, by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            attrs = {a.name: a for a in node.attribute}
            if "value" in attrs:
                values[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
        elif node.op_type == "Identity" and node.input[0] in values:  # the exporter's shared-weight alias
            values[node.output[0]] = values[node.input[0]]
    return values


_Stored = dict[tuple[str, tuple[int, ...], bytes], str]


def _weight_codes(codes: np.ndarray, name: str, graph: onnx.GraphProto, stored: _Stored) -> str:
    """Name of the initializer holding ``codes``, added as ``name`` unless an identical one is stored.

    Identical integer weights (cloned layers) are stored once, as torch.onnx stores identical float ones once.
    """
    key = (codes.dtype.str, codes.shape, hashlib.sha256(codes.tobytes()).digest())
    if key not in stored:
        graph.initializer.append(numpy_helper.from_array(codes, name))
        stored[key] = name
    return stored[key]


def _rewrite_one(
    node: onnx.NodeProto,
    index: int,
    values: dict[str, np.ndarray],
    graph: onnx.GraphProto,
    stored: _Stored,
) -> tuple[list[onnx.NodeProto], QdqNode]:
    attrs = _attrs(node)
    qmin, qmax, axis = int(attrs["qmin"]), int(attrs["qmax"]), int(attrs["axis"])
    point = attrs["point"].decode() if isinstance(attrs["point"], bytes) else str(attrs["point"])
    onnx_type, np_type = _INT_TYPES[(qmin, qmax)]
    x_name, scale_name = node.input[0], node.input[1]
    scale = values[scale_name].astype(np.float32)
    prefix = f"{point}/q{index}"
    new_scale, zp = f"{prefix}/scale", f"{prefix}/zero_point"
    graph.initializer.append(numpy_helper.from_array(scale, new_scale))
    graph.initializer.append(numpy_helper.from_array(np.zeros(scale.shape, dtype=np_type), zp))
    axis_attrs = {"axis": axis} if axis >= 0 else {}
    out = node.output[0]
    if x_name in values:
        w = values[x_name].astype(np.float32)
        shape = [1] * w.ndim
        if axis >= 0:
            shape[axis] = -1
        inv = np.reciprocal(scale).reshape(shape)
        codes = np.clip(np.rint(w * inv), qmin, qmax).astype(np_type)
        q_name = _weight_codes(codes, f"{prefix}/quantized", graph, stored)
        dq = helper.make_node(
            "DequantizeLinear",
            [q_name, new_scale, zp],
            [out],
            name=f"{prefix}/DequantizeLinear",
            **axis_attrs,
        )
        return [dq], QdqNode(point, out, q_name, True)
    q_name = f"{prefix}/quantized"
    q = helper.make_node(
        "QuantizeLinear", [x_name, new_scale, zp], [q_name], name=f"{prefix}/QuantizeLinear", **axis_attrs
    )
    dq = helper.make_node(
        "DequantizeLinear", [q_name, new_scale, zp], [out], name=f"{prefix}/DequantizeLinear", **axis_attrs
    )
    return [q, dq], QdqNode(point, out, q_name, False)


def _rewrite_cast(
    node: onnx.NodeProto,
    index: int,
    values: dict[str, np.ndarray],
    graph: onnx.GraphProto,
    stored: _Stored,
) -> tuple[list[onnx.NodeProto], QdqNode]:
    point = _attrs(node)["point"]
    point = point.decode() if isinstance(point, bytes) else str(point)
    x_name, out, prefix = node.input[0], node.output[0], f"{point}/c{index}"
    to_float = {"to": TensorProto.FLOAT}
    if x_name in values:
        half = np.clip(values[x_name].astype(np.float32), -FP16_MAX, FP16_MAX).astype(np.float16)
        h_name = _weight_codes(half, f"{prefix}/float16", graph, stored)
        cast = helper.make_node("Cast", [h_name], [out], name=f"{prefix}/Cast", **to_float)
        return [cast], QdqNode(point, out, h_name, True, cast=True)
    lo, hi, clipped, h_name = f"{prefix}/min", f"{prefix}/max", f"{prefix}/clipped", f"{prefix}/float16"
    graph.initializer.append(numpy_helper.from_array(np.array(-FP16_MAX, np.float32), lo))
    graph.initializer.append(numpy_helper.from_array(np.array(FP16_MAX, np.float32), hi))
    nodes = [
        helper.make_node("Clip", [x_name, lo, hi], [clipped], name=f"{prefix}/Clip"),
        helper.make_node("Cast", [clipped], [h_name], name=f"{prefix}/CastFloat16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", [h_name], [out], name=f"{prefix}/CastFloat", **to_float),
    ]
    return nodes, QdqNode(point, out, h_name, False, cast=True)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and constants nothing reads any more (the float copies of the weights)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
        if not dead and not unused:
            return


def rewrite_quant_points(model: onnx.ModelProto, opset: int) -> list[QdqNode]:
    """Replace every placeholder of ``model`` (in place) by QDQ / Cast nodes; return where each point went.

    Args:
        model: the traced ONNX model (placeholders in the ``qat_lightning`` domain).
        opset: the default-domain opset of the result (21 or more for int16).
    """
    graph = model.graph
    values = _constants(graph)
    placed: list[QdqNode] = []
    nodes: list[onnx.NodeProto] = []
    stored: _Stored = {}
    for node in graph.node:
        if node.domain == CUSTOM_DOMAIN and node.op_type in ("QuantDequant", "FakeCast"):
            rewrite = _rewrite_one if node.op_type == "QuantDequant" else _rewrite_cast
            new_nodes, qdq = rewrite(node, len(placed), values, graph, stored)
            nodes.extend(new_nodes)
            placed.append(qdq)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    imports = [o for o in model.opset_import if o.domain != CUSTOM_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    return placed
