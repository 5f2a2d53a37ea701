"""The op modules ``prepare`` puts at each op name of a prepared model.

Every class derives from :class:`QuantOp`, which carries the contract of :mod:`qat_lightning.quant.ops`:
``op_info``, ``input_quant`` (``nn.ModuleList``), ``weight_quant`` (or ``None``) and ``output_quant``.

* :class:`QatGemm`: conv / conv-transpose / linear module (optionally with a fused ReLU).
* :class:`QatConvBn`: conv (or linear) + BatchNorm, optionally + residual add and ReLU, in one of three QAT
  modes (see the class docstring).
* :class:`QatModuleOp`: any other module op (LayerNorm, Softmax, pooling, ...): output quant point.
  Norm ops use its subclass ``QatNormOp`` (:mod:`~.fp16_norm`: fp16 simulation, automatic input scaling).
* :class:`QatFunction`: a functional op / operator (``add``, ``matmul``, ``softmax``, ...).
* :class:`QatInput`: a model input (or a user's ``QuantStub``).

The float modules are kept as children (``module``, ``conv``, ``bn``), so parameters keep their identity:
several call sites of one shared module share its parameters and its weight quant node. In the FLOAT state
every quant node returns its input after one attribute test; the fused conv-bn in eval (any state) runs one
conv with the BN-folded weight and bias. The gemm ops add the deployed int32 bias in VALIDATION
(:mod:`.int_bias`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat_lightning.quant.dtypes import QuantDtype, float32
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState
from qat_lightning.quant.nodes.int_bias import deployed_bias
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch
from qat_lightning.quant.nodes.weight_quant import quantize_weight
from qat_lightning.quant.ops import OpInfo
from qat_lightning.quant.qconfig.qconfig import QConfig

__all__ = [
    "QAT_MODES",
    "QuantOp",
    "QatGemm",
    "QatConvBn",
    "QatModuleOp",
    "QatFunction",
    "QatInput",
    "activation_node",
    "weight_node",
    "fold_bn",
    "quantize_weight",
]

QAT_MODES: tuple[str, ...] = ("fuse_bn", "with_bn", "freeze_bn")


def activation_node(qconfig: QConfig, dtype: QuantDtype | None, name: str) -> FakeQuantize:
    """Build an input/output quant point of ``qconfig`` in ``dtype`` (``None``: a float32 pass-through)."""
    return qconfig.activation_fake_quant(dtype if dtype is not None else float32, name)


def weight_node(qconfig: QConfig, weight: Tensor, ch_axis: int, name: str) -> FakeQuantize:
    """Build the per-channel weight quant point (``float32`` when the qconfig has no weight dtype)."""
    return FakeQuantize(
        qconfig.weight_dtype if qconfig.weight_dtype is not None else float32,
        qconfig.weight_observer,
        ch_axis=ch_axis,
        num_channels=int(weight.shape[ch_axis]),
        name=name,
    )


class QuantOp(nn.Module):
    """Base of every op module: the quant nodes, the :class:`OpInfo` and call-site dispatch.

    ``_sites`` is set (eager mode only) on a module that is called more than once: call ``k`` of a forward
    runs on ``_sites[k % len(_sites)]`` (``_sites[0]`` is the module itself, the others are the ``name#k``
    op modules), so each call site has its own activation quant nodes. The counter is reset by a forward
    pre-hook on the prepared model.
    """

    def __init__(
        self,
        info: OpInfo,
        input_quant: Sequence[FakeQuantize] = (),
        weight_quant: FakeQuantize | None = None,
        output_quant: FakeQuantize | None = None,
    ) -> None:
        super().__init__()
        self.op_info = info
        self.input_quant = nn.ModuleList(input_quant)
        self.weight_quant = weight_quant
        self.output_quant = output_quant
        self._sites: list[QuantOp] | None = None
        self._calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the op (on the current call site's quant nodes in eager mode)."""
        sites = self._sites
        if sites is None:
            return self._forward(*args, **kwargs)
        k = self._calls
        self._calls = k + 1
        site = sites[k % len(sites)]
        if site is self or torch.compiler.is_exporting():
            # exported: the call site's nodes run inside this module's call (``name#k`` is no child of
            # ``name``, and torch.export.unflatten ran call 0's nodes for a nested ``name#k`` call)
            return site._forward(*args, **kwargs)
        return site(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _out(self, y: Any) -> Any:
        """Apply the output quant node to a tensor result."""
        q = self.output_quant
        if q is None or not isinstance(y, Tensor):
            return y
        return q(y)

    def extra_repr(self) -> str:
        """Show the op name and type."""
        return f"name={self.op_info.name!r}, op_type={self.op_info.op_type}"


def _gemm(
    kind: str, module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None, output_size: Any = None
) -> Tensor:
    if kind == "conv":
        return module._conv_forward(x, w, b)
    if kind == "linear":
        return F.linear(x, w, b)
    # conv-transpose (zeros padding only, as torch itself)
    nd = w.dim() - 2
    output_padding = module._output_padding(
        x, output_size, module.stride, module.padding, module.kernel_size, nd, module.dilation
    )
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(x, w, b, module.stride, module.padding, output_padding, module.groups, module.dilation)


class QatGemm(QuantOp):
    """Conv / conv-transpose / linear: input quant -> weight quant -> gemm (-> fused ReLU) -> output quant.

    Args:
        info: the op's :class:`OpInfo`.
        module: the float module (kept as child ``module``; parameters shared, not copied).
        kind: ``conv``, ``conv_transpose`` or ``linear``.
        relu: a ReLU fused after the gemm.
    """

    int_bias: bool = True

    def __init__(
        self,
        info: OpInfo,
        module: nn.Module,
        kind: str,
        input_quant: Sequence[FakeQuantize],
        weight_quant: FakeQuantize,
        output_quant: FakeQuantize,
        relu: bool = False,
    ) -> None:
        super().__init__(info, input_quant, weight_quant, output_quant)
        self.module = module
        self.kind = kind
        self.relu = relu

    def _forward(self, x: Tensor, output_size: Any = None) -> Tensor:
        m = self.module
        x, w = self.input_quant[0](x), quantize_weight(self.weight_quant, m.weight)
        y = _gemm(self.kind, m, x, w, deployed_bias(self, m.bias), output_size)
        return self.output_quant(torch.relu(y) if self.relu else y)


def fold_bn(
    weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[Tensor, Tensor]:
    """Fold eval-mode BatchNorm into the gemm before it: ``(w * s, (b - mean) * s + beta)``, s = gamma/std.

    A channel with ``gamma == 0`` gets a zero weight and ``bias = beta`` (no division, no NaN).
    """
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    b = -bn.running_mean if bias is None else bias - bn.running_mean
    b = b * scale
    if bn.bias is not None:
        b = b + bn.bias
    return w, b


class QatConvBn(QuantOp):
    """Conv (1d/2d/3d) or Linear + BatchNorm [+ residual add] [+ ReLU] as one op.

    ``qat_mode``:

    * ``fuse_bn`` (default): in train mode the weight quant node sees the folded weight
      ``w * s``, ``s = gamma / sqrt(running_var + eps)``; the conv runs with ``q(w * s) / s`` (the same as
      scaling the conv output back by ``1 / s``, torch.ao's "simulated fusion", but on the weight instead
      of the activation: no extra pass over the activations) and the BN then normalizes with the batch
      statistics and updates its running statistics. ``s`` is a constant in the fold (its gradient through
      fold and unfold is only the rounding error); gamma and beta get the float gradient through the BN.
      A channel with ``gamma == 0`` is folded with factor 1
      instead of 0, so nothing is divided by zero. In eval mode: one conv with the folded weight and bias
      (recomputed every forward; kept and reused inside :func:`~.frozen.frozen_parameters`, which the
      analysis tools and the QAT callback's evaluation loops enter). When the weight node is in FLOAT state
      (or fake quant is globally off) training runs the exact float ``bn(conv(x))``, and so does eval under
      ``torch.compile`` (no kept fold in a graph: re-folding 11 M weights every forward cost more than the
      BN).
    * ``with_bn``: BN is kept unfolded after the conv (the weight node sees the raw weight); the seed's
      ``QATMode.WithBN``.
    * ``freeze_bn``: always folded with the running statistics, which are never updated; gamma and beta are
      still trained. The BN stays in eval mode inside (``train()`` does not change it).

    With ``add`` the op takes ``(x, residual)``: the residual gets its own input quant node (``input.1``)
    and the add's output is the op's output. ``int_bias``: see :mod:`.int_bias` (not in ``with_bn``).
    """

    int_bias: bool = True

    def __init__(
        self,
        info: OpInfo,
        conv: nn.Module,
        bn: nn.modules.batchnorm._BatchNorm,
        kind: str,
        qat_mode: str,
        input_quant: Sequence[FakeQuantize],
        weight_quant: FakeQuantize,
        output_quant: FakeQuantize,
        relu: bool = False,
        add: bool = False,
    ) -> None:
        super().__init__(info, input_quant, weight_quant, output_quant)
        if qat_mode not in QAT_MODES:
            raise ValueError(f"unknown qat_mode {qat_mode!r}; allowed: {', '.join(QAT_MODES)}")
        self.conv = conv
        self.bn = bn
        self.kind = kind
        self.qat_mode = qat_mode
        self.relu = relu
        self.add = add
        if qat_mode == "freeze_bn":
            bn.train(False)

    def train(self, mode: bool = True) -> QatConvBn:
        """Set train/eval mode; in ``freeze_bn`` the BN stays in eval mode."""
        super().train(mode)
        if self.qat_mode == "freeze_bn":
            self.bn.train(False)
        return self

    def _conv_bn(self, x: Tensor) -> Tensor:
        conv, bn, wq = self.conv, self.bn, self.weight_quant
        if self.qat_mode == "with_bn":
            return bn(_gemm(self.kind, conv, x, quantize_weight(wq, conv.weight), conv.bias))
        folding = self.qat_mode == "fuse_bn" and bn.training
        weight_off = wq.state is FakeQuantState.FLOAT or not GlobalFakeQuantSwitch._enabled
        # the exact float op; traced eval too: no kept fold in a graph, and a BN costs less than a fold
        if weight_off and (folding or torch.compiler.is_compiling()):
            return bn(_gemm(self.kind, conv, x, conv.weight, conv.bias))
        if folding:
            scale = bn.running_var.add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight
            scale = scale.masked_fill(scale == 0, 1.0).reshape((-1,) + (1,) * (conv.weight.dim() - 1))
            # conv(x, q(w * s)) / s == conv(x, q(w * s) / s): un-fold on the weight, not the output
            return bn(_gemm(self.kind, conv, x, quantize_weight(wq, conv.weight, scale), conv.bias))
        w, b = self._folded()
        wq_w = quantize_weight(wq, w)  # before the bias: the deployed bias uses the current scale
        return _gemm(self.kind, conv, x, wq_w, deployed_bias(self, b))

    def _folded(self) -> tuple[Tensor, Tensor]:
        """``fold_bn`` of the current parameters; kept and reused only inside ``frozen_parameters``.

        Inside it the fold is recomputed when a parameter or BN statistic is replaced or changed in place
        through itself (its version moves); a change through ``.data`` (in place or a new ``.data``) moves
        no version, hence no reuse outside that block (a stale fold would be a silently wrong output).
        """
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if not self.__dict__.get("_reuse_fold") or torch.compiler.is_compiling():
            return fold_bn(conv.weight, conv.bias, bn)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return fold_bn(conv.weight, conv.bias, bn)
        key = (bn.eps,) + tuple(None if t is None else (t._version, t.device, t.dtype) for t in tensors)
        cache = self.__dict__.get("_fold_cache")  # keeps the tensors it was made from: no id is reused
        same = cache is not None and all(a is b for a, b in zip(cache[1], tensors, strict=True))
        if not same or cache[0] != key:
            with torch.no_grad():
                cache = (key, tensors, *fold_bn(conv.weight, conv.bias, bn))
            self.__dict__["_fold_cache"] = cache
        return cache[2], cache[3]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_fold_cache", None)  # derived data: not pickled, not deep-copied
        state.pop("_reuse_fold", None)  # a copy reuses no fold outside its own frozen_parameters block
        return state

    def _forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self._conv_bn(self.input_quant[0](x))
        if self.add:
            y = y.add_(self.input_quant[1](residual))
        return self.output_quant(torch.relu(y) if self.relu else y)

    def extra_repr(self) -> str:
        """Show name, type and QAT mode."""
        return f"{super().extra_repr()}, qat_mode={self.qat_mode}"


class QatModuleOp(QuantOp):
    """A non-gemm module op (norm, activation, pooling, resize, ...) followed by its output quant node."""

    def __init__(self, info: OpInfo, module: nn.Module, output_quant: FakeQuantize) -> None:
        super().__init__(info, (), None, output_quant)
        self.module = module

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.module(*args, **kwargs)
        return self._out(y)


class QatFunction(QuantOp):
    """A functional op or operator: ``target(*args, **kwargs)`` (or ``args[0].<target>(...)``) + quant nodes.

    Args:
        target: the function, or a method name when ``is_method``.
        act_args: positions of the activation inputs that get an input quant node (functional gemm ops).
        weight_arg: position of a weight argument (``F.linear`` / ``F.conv2d``) quantized per channel.
    """

    def __init__(
        self,
        info: OpInfo,
        target: Any,
        is_method: bool,
        output_quant: FakeQuantize,
        input_quant: Sequence[FakeQuantize] = (),
        act_args: Sequence[int] = (),
        weight_quant: FakeQuantize | None = None,
        weight_arg: int | None = None,
    ) -> None:
        super().__init__(info, input_quant, weight_quant, output_quant)
        self.target = target
        self.is_method = is_method
        self.act_args = tuple(act_args)
        self.weight_arg = weight_arg

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.act_args or self.weight_arg is not None:
            args_l = list(args)
            for q, i in zip(self.input_quant, self.act_args, strict=True):
                args_l[i] = q(args_l[i])
            if self.weight_arg is not None:
                args_l[self.weight_arg] = quantize_weight(self.weight_quant, args_l[self.weight_arg])
            args = tuple(args_l)
        if self.is_method:
            out = getattr(args[0], self.target)(*args[1:], **kwargs)
        else:
            out = self.target(*args, **kwargs)
        return self._out(out)

    def extra_repr(self) -> str:
        """Show name, type and the function."""
        target = self.target if self.is_method else getattr(self.target, "__name__", repr(self.target))
        return f"{super().extra_repr()}, target={target}"


class QatInput(QuantOp):
    """A model input quant point (``<arg>_quant``, or the path of a user's ``QuantStub``)."""

    def __init__(self, info: OpInfo, output_quant: FakeQuantize) -> None:
        super().__init__(info, (), None, output_quant)

    def _forward(self, x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return self.output_quant(x)
        return x
