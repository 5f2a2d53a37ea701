"""Weight fake quant of the gemm ops: :func:`quantize_weight` and its BN-folded form.

:func:`quantize_weight` runs a weight quant node with a straight-through gradient (no weight-sized work in
backward). ``QatConvBn`` in ``fuse_bn`` training quantizes the BN-folded weight and un-folds it every step:
done as written that is 7 passes over the weight (fold, range, 4 quantize passes, un-fold) and two new
tensors; :func:`fake_quantize_folded` takes 5 (range, multiply, round, clamp, multiply) and one. With the
opt-in ``cpu_kernels`` backend an eager float32 CPU weight is read once instead (same values).

Under ``torch.compile`` on CPU a computed 4-d (conv2d) weight is handed to the conv through
:func:`gemm_weight`, which copies it to channels-last in an op of its own when inductor's layout
optimization is on (what inductor does on CPU for every graph with a conv): inductor would otherwise fuse
that layout change into the fake-quant loop and, with the per-channel scales, vectorize it along the
output channel as a 16-wide gather and scatter (measured: 49.8 ms of a 502 ms profiled CNN step, against
14 ms in a contiguous loop; benchmarks/README.md, "QAT step"). The flag is read when the graph is traced.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch

__all__ = ["quantize_weight", "fake_quantize_folded", "gemm_weight"]

_WEIGHT_BACKEND_HOOK: list[Callable[[FakeQuantize, Tensor, Tensor | None], Tensor | None]] = []
"""The selected opt-in backend's QAT weight step (at most one; see ``qat_lightning.quant.backends``)."""


@torch.library.custom_op("qat_lightning::channels_last_weight", mutates_args=())
def _channels_last_weight(weight: Tensor) -> Tensor:
    """Return a channels-last copy of a 4-d weight (an op: inductor does not fuse it into its producer)."""
    return weight.clone(memory_format=torch.channels_last)


@_channels_last_weight.register_fake
def _(weight: Tensor) -> Tensor:
    return torch.empty_like(weight, memory_format=torch.channels_last)


def _gradient_as_is(ctx: Any, grad: Tensor) -> Tensor:
    return grad


_channels_last_weight.register_autograd(_gradient_as_is)


def _inductor_layout_optimization() -> bool:
    """Return inductor's ``layout_optimization`` flag (``False`` when inductor is not loaded)."""
    config = sys.modules.get("torch._inductor.config")
    return bool(getattr(config, "layout_optimization", False))


def gemm_weight(weight: Tensor, source: Tensor) -> Tensor:
    """Return the computed gemm ``weight`` (from the parameter ``source``) in the layout its conv reads.

    Under ``torch.compile`` (not ``torch.export``), on CPU, for a 4-d weight computed from ``source``, with
    inductor's layout optimization on: a channels-last copy made by an op of its own (see the module
    docstring). Otherwise ``weight`` itself. Values are unchanged; the gradient passes as is.
    """
    if (
        weight is not source
        and weight.dim() == 4
        and weight.device.type == "cpu"
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and _inductor_layout_optimization()
    ):
        return _channels_last_weight(weight)
    return weight


def fake_quantize_folded(wq: FakeQuantize, weight: Tensor, fold: Tensor) -> Tensor:
    """Return ``wq(weight * fold) / fold`` for a per-channel weight node moving its scale in QAT.

    The range comes from ``weight`` and the per-channel ``fold`` (exactly that of ``weight * fold``: the
    observer takes the products of the extremes), and the value is
    ``clamp(round(weight * (fold / s)), qmin, qmax) * (s / fold)``: each product is rounded once instead of
    twice, so a value can differ from the unfused chain in its last bit, and a code whose scaled weight lies
    within a rounding error of a .5 boundary by one step. Any other node (state, scale mode, axis, dtype)
    runs the unfused chain.

    Args:
        wq: the weight quant node (``ch_axis`` 0: the output channel).
        weight: the float32 weight.
        fold: nonzero per-output-channel factor, broadcastable to ``weight`` along axis 0.
    """
    dtype = wq.dtype
    if not (
        wq.state is FakeQuantState.QAT
        and wq.scale_mode == "moving"
        and wq.ch_axis == 0
        and dtype.is_integer
        and weight.dtype == torch.float32
        and GlobalFakeQuantSwitch._enabled
    ):
        return wq(weight * fold) / fold
    f = fold.reshape(-1)
    scale = wq._follow_batch(weight, f)  # the node's own QAT rule, on the range of weight * fold
    shape = (-1,) + (1,) * (weight.dim() - 1)
    codes = (weight * (f / scale).reshape(shape)).round_().clamp_(dtype.qmin, dtype.qmax)
    return codes.mul_((scale / f).reshape(shape))


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value`` (computed without autograd); backward: the gradient goes to ``source`` as is."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, value: Tensor) -> Tensor:  # noqa: D102
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def quantize_weight(wq: FakeQuantize, weight: Tensor, fold: Tensor | None = None) -> Tensor:
    """``wq(weight * fold) / fold`` (``fold`` broadcast per output channel; ``None`` = no fold).

    Fast path (QAT state, scale not fixed, autograd on): the weight scale is the current per-channel
    ``|w|`` max, so no weight is clipped and the STE gradient of the whole fold -> fake quant -> unfold
    chain is the identity (the fold factor is a constant here; gamma gets its gradient through the BN).
    The value is then computed without autograd and the gradient passes straight through: no weight-sized
    work in backward, nothing saved. Otherwise the chain runs under autograd as written.
    """
    if (
        wq.state is FakeQuantState.QAT
        and not wq.is_fixed
        and GlobalFakeQuantSwitch._enabled
        and weight.requires_grad
        and torch.is_grad_enabled()
    ):
        with torch.no_grad():
            value = None
            if _WEIGHT_BACKEND_HOOK and not torch.compiler.is_compiling():  # eager only, as activations
                value = _WEIGHT_BACKEND_HOOK[0](wq, weight, fold)
            if value is None:
                value = wq(weight) if fold is None else fake_quantize_folded(wq, weight, fold)
            value = gemm_weight(value, weight)
        return _StraightThrough.apply(weight, value)
    if fold is None:
        return gemm_weight(wq(weight), weight)
    fold = fold.detach()
    return gemm_weight(wq(weight * fold) / fold, weight)
