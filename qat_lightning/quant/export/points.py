"""Export semantics of a prepared model: every quant node becomes an op the ONNX exporter can write.

While :func:`export_points` is active, every :class:`~qat_lightning.quant.FakeQuantize` of the model is in
the ``FLOAT`` state (its own forward is the identity, so none of its kernels are traced) and a forward hook
replaces its output by what the deployed model computes with the node's frozen (``VALIDATION``) scale:

* ``qint8`` / ``qint16``: :class:`QuantDequantPoint`, an autograd function whose ``symbolic`` writes one
  ``qat_lightning::QuantDequant`` node (attributes ``qmin``, ``qmax``, ``axis``, ``point``). The graph pass
  in :mod:`~qat_lightning.quant.export.qdq_graph` turns it into ``QuantizeLinear`` → ``DequantizeLinear``
  (or an integer initializer → ``DequantizeLinear`` for a constant weight).
* ``float16``: :class:`FakeCastPoint`, one ``qat_lightning::FakeCast`` node (attribute ``point``) that the
  graph pass turns into ``Clip(±65504)`` → ``Cast(float16)`` → ``Cast(float32)`` (the node's saturating fake
  cast), or a float16 initializer → ``Cast(float32)`` for a constant weight.
* ``float32``: untouched.

The hooks follow the process switches as the node's forward does: a node reached while
``GlobalFakeQuantSwitch`` is off (or, for ``float16``, ``FakeCast`` is off) stays float in the graph. Norm
ops with a ``float16`` output run their fp16 simulation (:mod:`~qat_lightning.quant.export.norms`).

Only the node's public surface is used (``state``, ``dtype``, ``scale``, ``ch_axis``, ``is_fixed``, module
hooks), so the export does not depend on how the node computes fake quant. Everything is restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.quant import (
    FakeQuantize,
    FakeQuantState,
    iter_fake_quantize,
    iter_quant_ops,
    quant_nodes_of,
)
from qat_lightning.quant.export.norms import export_cast, exporting_norms
from qat_lightning.quant.nodes.int_bias import exporting_bias
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

__all__ = [
    "CUSTOM_DOMAIN",
    "QuantPoint",
    "QuantDequantPoint",
    "FakeCastPoint",
    "collect_points",
    "export_points",
]

CUSTOM_DOMAIN = "qat_lightning"
"""ONNX domain of the placeholder node written by the tracer (none is left in a finished export)."""


@dataclass(frozen=True)
class QuantPoint:
    """One quant node of a prepared model, named as the rest of the project names it.

    Attributes:
        node: qualified module path of the :class:`FakeQuantize` (unique; the ``point`` attribute in ONNX).
        op_name: name of the op that owns it (the per-layer table's op name), ``""`` if none does.
        role: ``input.<i>``, ``weight`` or ``output`` (``""`` if no op owns the node).
        dtype: ``qint8``, ``qint16``, ``float16`` or ``float32``.
        scale: the node's scale (a list per channel, a float per tensor; empty for float dtypes).
        axis: the channel axis of a per-channel node, else ``None``.
        fixed: whether the scale is pinned (fixed-scale observer or ``fix_scale()``).
    """

    node: str
    op_name: str
    role: str
    dtype: str
    scale: tuple[float, ...]
    axis: int | None
    fixed: bool


def _owners(model: nn.Module) -> dict[int, tuple[str, str]]:
    """``id(node) -> (op name, role)`` from the prepared model's op modules."""
    owners: dict[int, tuple[str, str]] = {}
    for op_name, op in iter_quant_ops(model):
        for role, node in quant_nodes_of(op).items():
            owners.setdefault(id(node), (op_name, role))
    return owners


def collect_points(model: nn.Module) -> list[QuantPoint]:
    """Describe every quant node of ``model`` (scales as the ``VALIDATION`` state would use them)."""
    owners = _owners(model)
    points = []
    for path, node in iter_fake_quantize(model):
        dtype = node.dtype
        scale = tuple(float(v) for v in node.scale.detach().float().reshape(-1)) if dtype.is_integer else ()
        op_name, role = owners.get(id(node), ("", ""))
        points.append(QuantPoint(path, op_name, role, dtype.name, scale, node.ch_axis, bool(node.is_fixed)))
    return points


class QuantDequantPoint(torch.autograd.Function):
    """``clamp(round(x * (1 / scale)), qmin, qmax) * scale``; the TorchScript exporter writes one node."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, qmin: int, qmax: int, axis: int, point: str) -> Tensor:  # noqa: D102
        s = scale
        if axis >= 0:
            shape = [1] * x.dim()
            shape[axis] = -1
            s = scale.reshape(shape)
        return torch.clamp(torch.round(x * s.reciprocal()), qmin, qmax) * s

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, qmin: int, qmax: int, axis: int, point: str) -> Any:  # noqa: D102
        out = g.op(
            f"{CUSTOM_DOMAIN}::QuantDequant", x, scale, qmin_i=qmin, qmax_i=qmax, axis_i=axis, point_s=point
        )
        out.setType(x.type())
        return out


class FakeCastPoint(torch.autograd.Function):
    """The saturating fake cast (``clamp(±65504)``, to float16 and back); the exporter writes one node."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, point: str) -> Tensor:  # noqa: D102
        return export_cast(x)

    @staticmethod
    def symbolic(g: Any, x: Any, point: str) -> Any:  # noqa: D102
        out = g.op(f"{CUSTOM_DOMAIN}::FakeCast", x, point_s=point)
        out.setType(x.type())
        return out


def _export_hook(path: str, node: FakeQuantize) -> Any:
    dtype = node.dtype
    if dtype.is_integer:
        scale = node.scale.detach().float().clone()
        axis = -1 if node.ch_axis is None else int(node.ch_axis)

        def quant_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0]
            if not (GlobalFakeQuantSwitch._enabled and isinstance(x, Tensor) and x.is_floating_point()):
                return out
            ax = axis if axis < 0 else axis % x.dim()
            return QuantDequantPoint.apply(x, scale.to(x.device), dtype.qmin, dtype.qmax, ax, path)

        return quant_hook

    def cast_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        x = args[0]
        on = GlobalFakeQuantSwitch._enabled and FakeCastSwitch._enabled  # as FakeQuantize.forward
        if not (on and isinstance(x, Tensor) and x.dtype == torch.float32):
            return out
        return FakeCastPoint.apply(x, path)

    return cast_hook


@contextmanager
def export_points(model: nn.Module) -> Iterator[list[QuantPoint]]:
    """Put ``model`` in export semantics (see the module docstring) and restore it on exit.

    Yields:
        The model's quant points (:func:`collect_points`), scales refreshed before anything is changed.
    """
    points = collect_points(model)
    nodes = list(iter_fake_quantize(model))
    saved = [(node, node.state) for _, node in nodes]
    handles = []
    try:
        for path, node in nodes:
            node.state = FakeQuantState.FLOAT
            if not node.dtype.is_float32:
                handles.append(node.register_forward_hook(_export_hook(path, node)))
        with exporting_bias(model), exporting_norms(model):  # the deployed int32 bias, the fp16 norms
            yield points
    finally:
        for handle in handles:
            handle.remove()
        for node, state in saved:
            node.state = state
