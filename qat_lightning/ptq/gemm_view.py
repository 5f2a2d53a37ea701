"""The one adapter between the post-training algorithms and a prepared model's gemm ops.

Bias correction and AdaRound need, for each conv / linear op of a prepared model, the weight its weight
quant node sees (BN-folded for a fused conv-bn), a way to write a new value of that weight and to shift the
op's bias, and the op's gemm on a given input and weight. :func:`gemm_views` reads those from the op
modules' public attributes (``op_info``, ``input_quant``, ``weight_quant``, ``module`` / ``conv`` + ``bn``,
``kind``, ``qat_mode``); every other part of ``qat_lightning.ptq`` goes through :class:`GemmView`, so a
change of the op modules touches this file only. Every write of a float parameter through a view records
the value it overwrites first (:mod:`qat_lightning.ptq.float_record`), so the float model stays known.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat_lightning.ptq.float_record import mark_written, remember, restore
from qat_lightning.quant import FakeQuantize, FakeQuantState, iter_fake_quantize, iter_quant_ops
from qat_lightning.quant.checks import require_module

__all__ = ["GemmView", "calibrated_views", "gemm_views"]

_KINDS = ("linear", "conv")


@dataclass(frozen=True)
class GemmView:
    """One conv / linear op of a prepared model, as the post-training algorithms see it.

    Attributes:
        name: the op name.
        op: the op module.
        kind: ``"linear"`` or ``"conv"``.
        module: the float conv / linear module (parameters shared with the model).
        bn: the BatchNorm folded into the op (eval-mode fold), or ``None``.
        input_quant: the activation quant node of the gemm's input.
        weight_quant: the per-output-channel weight quant node.
        output_quant: the op's output quant node.
    """

    name: str
    op: nn.Module
    kind: str
    module: nn.Module
    bn: nn.modules.batchnorm._BatchNorm | None
    input_quant: FakeQuantize
    weight_quant: FakeQuantize
    output_quant: FakeQuantize

    def _fold(self) -> Tensor:
        bn = self.bn
        if bn is None:
            raise RuntimeError(f"{self.name}: no BatchNorm folded into this op")
        scale = bn.running_var.add(bn.eps).rsqrt()
        return scale * bn.weight if bn.weight is not None else scale

    def _per_channel(self, t: Tensor) -> Tensor:
        return t.reshape((-1,) + (1,) * (self.module.weight.dim() - 1))

    def weight(self) -> Tensor:
        """Return the weight the weight quant node sees (``w * gamma / std`` for a conv-bn), detached."""
        w = self.module.weight.detach()
        return w if self.bn is None else w * self._per_channel(self._fold().detach())

    def bias(self) -> Tensor | None:
        """Return the op's effective bias (BN-folded for a conv-bn), detached."""
        b = self.module.bias
        if self.bn is None:
            return None if b is None else b.detach()
        bn = self.bn
        fold = self._fold().detach()
        base = -bn.running_mean if b is None else b.detach() - bn.running_mean
        return base * fold + (bn.bias.detach() if bn.bias is not None else 0.0)

    @torch.no_grad()
    def set_weight(self, value: Tensor) -> None:
        """Write ``value`` as the weight the quant node sees (un-folded into the conv for a conv-bn).

        The float weight it overwrites is recorded first (kept from an earlier write), with the weight dtype.
        """
        if self.bn is not None:
            fold = self._fold()
            value = value / self._per_channel(fold.masked_fill(fold == 0, 1.0))
        remember(self.module, "weight", self.weight_quant.dtype.name)
        self.module.weight.copy_(value)
        mark_written(self.module, "weight")

    def restore_weight(self) -> bool:
        """Write the recorded original float weight back (see :func:`~.float_record.restore`)."""
        return restore(self.module, "weight")

    @property
    def bias_owner(self) -> nn.Module:
        """The module whose ``bias`` is the op's bias: the folded BN (its beta) or the conv / linear."""
        return self.bn if self.bn is not None else self.module

    def restore_bias(self) -> bool:
        """Write the recorded original float bias back (see :func:`~.float_record.restore`)."""
        return restore(self.bias_owner, "bias")

    @property
    def has_bias(self) -> bool:
        """Whether the op has a bias parameter to shift (the BN's beta for a folded conv-bn)."""
        return isinstance(self.bias_owner.bias, Tensor)

    @torch.no_grad()
    def shift_bias(self, delta: Tensor) -> None:
        """Add ``delta`` (one value per output channel) to the op's bias (the original is recorded first).

        Raises:
            ValueError: when the op has no bias (adding one would change the model's state_dict keys).
        """
        owner = self.bias_owner
        if not isinstance(owner.bias, Tensor):
            raise ValueError(f"{self.name}: the op has no bias to shift")
        remember(owner, "bias")
        owner.bias.add_(delta.to(owner.bias))
        mark_written(owner, "bias")

    def gemm(self, x: Tensor, weight: Tensor) -> Tensor:
        """Compute the op's conv / linear of ``x`` with ``weight`` (as the weight node sees it) + bias."""
        bias = self.bias()
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return self.module._conv_forward(x, weight, bias)

    @property
    def channel_dim(self) -> int:
        """The output channel dimension of the op's output (-1 for linear, 1 for conv)."""
        return -1 if self.kind == "linear" else 1


def _view_of(name: str, op: nn.Module) -> GemmView | str:
    """Return a :class:`GemmView` of ``op``, or the reason it is not one."""
    wq = getattr(op, "weight_quant", None)
    inputs = getattr(op, "input_quant", None)
    kind = getattr(op, "kind", None)
    if not isinstance(wq, FakeQuantize) or not inputs or kind not in _KINDS:
        return "not a conv / linear module op"
    if not wq.dtype.is_integer:
        return f"weight dtype {wq.dtype.name} is not an integer type"
    bn = getattr(op, "bn", None)
    module = getattr(op, "conv", None) if bn is not None else getattr(op, "module", None)
    if bn is not None and getattr(op, "qat_mode", "") == "with_bn":
        return "BatchNorm kept unfolded (qat_mode with_bn)"
    if not isinstance(module, nn.Module) or not isinstance(getattr(module, "weight", None), Tensor):
        return "no float module with a weight"
    out = getattr(op, "output_quant", None)
    if not isinstance(out, FakeQuantize):
        return "no output quant node"
    return GemmView(name, op, kind, module, bn, inputs[0], wq, out)


def gemm_views(model: nn.Module) -> Iterator[GemmView | tuple[str, str]]:
    """Yield a :class:`GemmView` per conv / linear op of a prepared model, in graph order.

    Every other op with a weight quant node is yielded as ``(name, reason it is skipped)``.
    """
    for name, op in iter_quant_ops(model):
        if getattr(op, "weight_quant", None) is None:
            continue
        view = _view_of(name, op)
        yield view if isinstance(view, GemmView) else (name, view)


def calibrated_views(model: nn.Module, who: str) -> tuple[list[GemmView], tuple[tuple[str, str], ...]]:
    """Return the :class:`GemmView` s of a calibrated model, and the weighted ops skipped with the reason.

    Raises:
        TypeError: when ``model`` is not a module.
        ValueError: when the model has no conv / linear op, a node is still in CALIBRATION state (running
            it would change its statistics) or a quant node of a gemm op has no calibrated scale yet.
    """
    require_module(model, who, "model")
    views: list[GemmView] = []
    skipped: list[tuple[str, str]] = []
    for item in gemm_views(model):
        if isinstance(item, GemmView):
            views.append(item)
        else:
            skipped.append(item)
    if not views:
        raise ValueError(f"{who}: the model has no prepared conv / linear op (call ql.prepare first)")
    for _, node in iter_fake_quantize(model):
        if node.state is FakeQuantState.CALIBRATION:
            raise ValueError(
                f"{who}: quant node {node.name!r} is in CALIBRATION state; finish calibration first"
            )
    for view in views:
        for node in (view.input_quant, view.weight_quant):
            node.scale  # noqa: B018 - reading the scale brings it up to date with the statistics
            if node.dtype.is_integer and not bool(node.scale_ready):
                raise ValueError(
                    f"{who}: {view.name!r} is not calibrated (node {node.name!r} has no scale); "
                    "calibrate the model first"
                )
    return views, tuple(skipped)
