"""The fp16 norm simulation in the export: the ONNX graph computes what VALIDATION computes.

A norm op (LayerNorm, GroupNorm) whose output node is ``float16`` runs, in VALIDATION with fake cast on,
step by step in fp16 (:mod:`~qat_lightning.quant.nodes.fp16_norm`: every intermediate rounded, optional
power-of-two input scaling). During the export every quant node is in ``FLOAT`` (see
:mod:`~qat_lightning.quant.export.points`), which would switch that simulation off and export a float32
norm: with large inputs (``|x - mean| > 256``, scaling off) the fp16 squares saturate in fake quant but not
in the graph. :func:`exporting_norms` therefore runs the same simulation while the model is traced, with the
cast written as ``Clip`` → ``Cast(float16)`` → ``Cast(float32)`` and the input factor ``k`` computed with ONNX
ops: ``ceil(log2(max|x| / 64))`` (``Log`` / ``Div`` in the graph, which may be one off at a power of two),
corrected by two exact power-of-two comparisons so that ``k`` is exactly ``min(1, 2^-ceil(log2(max|x|/64)))``,
the simulation's factor. The switches are read when the op runs, as the op's forward reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.nodes.fp16_norm import (
    NORM_FUNCTIONS,
    SAFE_AMAX,
    QatNormFunction,
    QatNormOp,
    fp16_group_norm,
    fp16_layer_norm,
)
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

__all__ = ["exporting_norms", "export_cast", "export_input_scale"]

FP16_MAX = 65504.0


def export_cast(x: Tensor) -> Tensor:
    """``fake_cast`` as traceable ops: clamp to ±65504, to float16 and back (``x``'s dtype)."""
    return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)


def export_input_scale(x: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """``norm_input_scale`` with ONNX ops: ``k = min(1, 2^-ceil(log2(max|x| / SAFE_AMAX)))`` (exact).

    One factor per group normalized over ``dims`` (kept dims, broadcasting over ``x``), as the node's
    simulation; ``None``: one for the whole tensor (0-d).
    """
    a = x.detach().abs()
    amax = (a.amax() if dims is None else a.amax(dims, keepdim=True)).float()
    k = torch.pow(2.0, -torch.ceil(torch.log2(amax / SAFE_AMAX)))
    k = torch.where(amax * (k * 2.0) <= SAFE_AMAX, k * 2.0, k)  # the log was one too high
    k = torch.where(amax * k > SAFE_AMAX, k * 0.5, k)  # one too low
    return k.clamp(max=1.0)


def _fp16_on(node: FakeQuantize | None) -> bool:
    """Whether the op simulates fp16 in VALIDATION now (the export writes every node as VALIDATION)."""
    return (
        node is not None
        and node.dtype.is_float16
        and GlobalFakeQuantSwitch._enabled
        and FakeCastSwitch._enabled
    )


def _simulate(
    fn: Callable[..., Tensor], x: Tensor, second: Any, weight: Any, bias: Any, eps: Any, scaling: bool
) -> Tensor:
    """``fn`` (``fp16_layer_norm`` / ``fp16_group_norm``) with the export cast and the export input factor."""
    if scaling:  # one factor per normalization group, as fp16_layer_norm / fp16_group_norm scale
        x = export_cast(x)
        if fn is fp16_group_norm:
            xg = x.reshape(x.shape[0], second, -1)
            k = export_input_scale(xg, (-1,)).to(x.dtype)
            x, eps = (xg * k).reshape(x.shape), eps * k * k  # eps (n, groups, 1) broadcasts per group
        else:
            ndim = 1 if isinstance(second, int) else len(second)
            k = export_input_scale(x, tuple(range(-ndim, 0))).to(x.dtype)
            x, eps = x * k, eps * k * k  # fn casts x * k again, as the simulation does
    return fn(x, second, weight, bias, eps, auto_scale=False, cast=export_cast)


def _module_forward(op: QatNormOp) -> Callable[..., Any]:
    float_forward = type(op)._forward

    def forward(x: Tensor) -> Any:
        if not _fp16_on(op.output_quant):
            return float_forward(op, x)
        m, scaling = op.module, op.fp16_input_scaling
        if isinstance(m, nn.GroupNorm):
            y = _simulate(fp16_group_norm, x, m.num_groups, m.weight, m.bias, m.eps, scaling)
        else:
            y = _simulate(fp16_layer_norm, x, m.normalized_shape, m.weight, m.bias, m.eps, scaling)
        return op._out(y)

    return forward


def _function_forward(op: QatNormFunction) -> Callable[..., Any]:
    float_forward = type(op)._forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _fp16_on(op.output_quant):
            return float_forward(op, *args, **kwargs)
        names = ("input", NORM_FUNCTIONS[op.target], "weight", "bias", "eps")
        values = [*args, *(None, None, None, None, 1e-5)[len(args) :]]
        values = [kwargs.get(n, v) for n, v in zip(names, values, strict=True)]
        fn = fp16_group_norm if op.target is torch.nn.functional.group_norm else fp16_layer_norm
        return op._out(_simulate(fn, *values, op.fp16_input_scaling))

    return forward


def _norm_ops(model: nn.Module) -> list[QatNormOp | QatNormFunction]:
    found: dict[int, Any] = {}
    for module in model.modules():
        for op in [module, *(getattr(module, "_sites", None) or ())]:
            if isinstance(op, (QatNormOp, QatNormFunction)):
                found.setdefault(id(op), op)
    return list(found.values())


@contextmanager
def exporting_norms(model: nn.Module) -> Iterator[None]:
    """Make every norm op of ``model`` run the traceable fp16 simulation (see the module docstring)."""
    patched = []
    try:
        for op in _norm_ops(model):
            previous = op.__dict__.get("_forward")
            make = _module_forward if isinstance(op, QatNormOp) else _function_forward
            op.__dict__["_forward"] = make(op)
            patched.append((op, previous))
        yield
    finally:
        for op, previous in patched:
            if previous is None:
                op.__dict__.pop("_forward", None)
            else:
                op.__dict__["_forward"] = previous
