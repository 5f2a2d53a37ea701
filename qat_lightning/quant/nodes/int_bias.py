"""The deployed (int32) bias of a quantized conv / linear, simulated in fake quant.

A deployment runtime stores the bias of a gemm whose input and weight are integer as ``int32`` at scale
``s_in * s_w`` (per output channel), zero point 0: onnxruntime's ``WeightBiasQuantization`` graph pass
(optimization level ``basic`` and above), fbgemm, and the int8 accelerators. So the bias the deployed model
adds is ``round(b / (s_in * s_w)) * (s_in * s_w)``, saturated to int32, not ``b``. An op of a prepared model
(:class:`~qat_lightning.quant.nodes.qat_modules.QatGemm`, ``QatConvBn``) computes that bias with
:func:`deployed_bias` when

* its ``int_bias`` attribute is true (``prepare(..., int_bias=True)``, the default),
* its input is integer (``qint8`` / ``qint16``: its own input node, or, for an input left as produced
  (a ``float32`` pass-through node), the output node of the op producing it) and so is its weight node,
* those nodes are in the ``VALIDATION`` state (or the model is being exported: :func:`exporting_bias`),
  and integer fake quant is globally on.

In ``QAT`` and ``CALIBRATION`` the bias stays float: calibration observes unquantized activations (there is
no input scale yet) and QAT trains the float bias, whose rounding step (``s_in * s_w``, about 1/100 of an
output step) is below what training resolves. A float16 (``Cast``) or float32 input keeps a float bias, as
in onnxruntime. The rounding is a straight-through estimator: a gradient reaches the float bias unchanged.
Only tensor ops: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantState
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch

__all__ = ["INT32_MIN", "INT32_MAX", "round_bias", "deployed_bias", "exporting_bias", "set_int_bias"]

INT32_MIN: int = -(2**31)
INT32_MAX: int = 2**31 - 1


def round_bias(bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:
    """``round(bias / s) * s`` with ``s = input_scale * weight_scale``, the integer saturated to int32.

    Args:
        bias: the float bias, one value per output channel.
        input_scale: the input's per-tensor scale (0-d or one element).
        weight_scale: the weight's scale, per output channel or per tensor.

    Returns:
        The bias as the deployed model adds it (same dtype as ``bias``; round half to even, like
        ``QuantizeLinear``).
    """
    dtype = torch.promote_types(bias.dtype, torch.float32)  # a half bias: the int32 code needs float32
    s = (input_scale * weight_scale).reshape(-1).to(dtype)
    return (torch.round(bias.to(dtype) / s).clamp_(INT32_MIN, INT32_MAX) * s).to(bias.dtype)


class _RoundBias(torch.autograd.Function):
    """Forward: the deployed bias; backward: the gradient goes to the float bias as is."""

    @staticmethod
    def forward(ctx: Any, bias: Tensor, input_scale: Tensor, weight_scale: Tensor) -> Tensor:  # noqa: D102
        return round_bias(bias, input_scale, weight_scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        return grad, None, None


def _bias_nodes(op: nn.Module, bias: Tensor | None) -> tuple[Any, Any] | None:
    """``(input node, weight node)`` whose scales make ``op``'s int32 bias step, or ``None`` (float bias)."""
    if bias is None or not op.int_bias or not GlobalFakeQuantSwitch._enabled:
        return None
    xq, wq = op.input_quant[0], op.weight_quant
    if not xq.dtype.is_integer:  # input left as produced: the producer's output node quantized it
        xq = op.__dict__.get("_bias_producer")
        if xq is None or not xq.dtype.is_integer:
            return None
    if not wq.dtype.is_integer or wq._buffers["scale"].numel() not in (1, bias.numel()):
        return None  # (a grouped conv-transpose has the per-channel scale of one group)
    return xq, wq


def deployed_bias(op: nn.Module, bias: Tensor | None) -> Tensor | None:
    """Return the bias ``op`` (a gemm op: ``input_quant[0]``, ``weight_quant``) adds; see the module doc.

    Call it after the op's input and weight nodes ran in this forward (their ``scale`` is then current).
    """
    exported = op.__dict__.get("_exported_bias")
    if exported is not None:
        return exported
    nodes = _bias_nodes(op, bias)
    if nodes is None:
        return bias
    xq, wq = nodes
    if xq.state is not FakeQuantState.VALIDATION or wq.state is not FakeQuantState.VALIDATION:
        return bias
    return _RoundBias.apply(bias, xq._buffers["scale"], wq._buffers["scale"])


def _float_bias(op: nn.Module) -> Tensor | None:
    """Return the float bias ``op``'s eval forward adds (BN folded); ``None`` for ``with_bn``."""
    if getattr(op, "qat_mode", "") == "with_bn":
        return None
    module = op.__dict__["_modules"].get("module")
    return module.bias if module is not None else op._folded()[1]


@contextmanager
def exporting_bias(model: nn.Module) -> Iterator[None]:
    """While active, every gemm op of ``model`` adds its deployed bias as a constant, whatever the state.

    Used by the ONNX export (which puts every quant node in ``FLOAT``; its hooks compute the quantized
    values): the constant becomes the bias initializer, already on the int32 grid, so the graph computes
    the same with or without onnxruntime's ``WeightBiasQuantization``.
    """
    ops = [m for m in model.modules() if hasattr(type(m), "int_bias")]
    try:
        with torch.no_grad():
            for op in ops:
                bias = _float_bias(op)
                nodes = _bias_nodes(op, bias)
                if nodes is not None:
                    op.__dict__["_exported_bias"] = round_bias(bias, nodes[0].scale, nodes[1].scale)
        yield
    finally:
        for op in ops:
            op.__dict__.pop("_exported_bias", None)


def set_int_bias(model: nn.Module, enabled: bool) -> int:
    """Turn the deployed int32 bias on or off on every gemm op of ``model``; return how many ops have it.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"int_bias must be True or False, got {enabled!r}")
    by_name = {getattr(m, "op_info", None) and m.op_info.name: m for m in model.modules()}
    ops = [m for m in model.modules() if hasattr(type(m), "int_bias")]
    for op in ops:
        op.int_bias = enabled
        producers = op.op_info.input_producers
        producer = by_name.get(producers[0]) if producers and producers[0] else None
        node = getattr(producer, "output_quant", None)
        if node is not None:  # a plain reference (not a submodule): deep copies of the model keep it
            op.__dict__["_bias_producer"] = node
    return len(ops)
