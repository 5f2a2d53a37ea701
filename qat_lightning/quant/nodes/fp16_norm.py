"""fp16 execution of norm ops (LayerNorm, GroupNorm) with automatic input scaling.

On a chip that runs non-gemm ops in fp16 (j6p), a norm op computes its variance term ``(x - mean)^2`` in
fp16: once ``|x - mean|`` exceeds ``sqrt(65504) ~ 256`` the squares saturate and the output is wrong. The
seed: "The framework automatically scales the FP16 configuration of the layernorm operator". Here:

* **simulation**: when a prepared norm op's output node is ``float16`` and fake cast is active (QAT or
  VALIDATION state, :class:`GlobalFakeQuantSwitch` and ``FakeCast`` on), the op computes every intermediate
  as fp16 hardware would: input, mean, ``x - mean``, square, variance, ``var + eps``, rsqrt, normalized
  value, ``* weight``, ``+ bias``, each fake-cast to fp16 (rounded, saturating at ±65504; reductions
  accumulate in fp32 and round their result). Otherwise (FLOAT / CALIBRATION state, int or fp32 configs,
  fake cast off) it runs the float module or function exactly as before, bit for bit.
* **automatic input scaling** (on by default): the fp16 input is first multiplied by a power of two
  ``k = min(1, 2^-ceil(log2(amax / 64)))``, ``amax`` the ``max|x|`` of the values normalized together
  (one factor per normalization group: a LayerNorm row, a GroupNorm group of one sample; recomputed every
  forward, no gradient through ``k``), and ``eps`` becomes ``eps * k^2``. Since ``|x - mean| <= 2 * amax``,
  ``|k (x - mean)| <= 128`` and the squares stay below ``16384``. A norm is scale invariant:
  ``LayerNorm(k x, eps k^2) == LayerNorm(x, eps)`` exactly in real arithmetic (tested in float64), and a
  power-of-two factor is exact in fp16 (unless values fall into subnormals). Groups with ``amax <= 64``
  are never rescaled (``k = 1``, never upscaled): they compute exactly what unscaled fp16 computes.
  Why per group, not per tensor: the chip normalizes each group on its own, and the factor only has to
  keep *that* group's squares in range. One factor per tensor, set by an outlier elsewhere, pushed the
  squares of a quiet row into fp16 underflow (k = 1/32 for a 1500 outlier: a row of ±0.003 has squares
  ~9e-9 and ``eps * k^2 ~ 1e-8``, both below fp16's smallest subnormal 6e-8): its variance became 0 and
  the row came out 6.14 instead of 0.688. Per group, only a group with its own ``max|x| > 64`` is scaled:
  its deviations from the mean are either large or, when its values crowd around a mean of about
  ``max|x|``, at least the fp16 spacing there (``~max|x| * 2^-11``, ``>= 2^-6`` once scaled), so its
  squares stay far above fp16's subnormals. ``var + eps * k^2`` is added in float32 and rounded once (as a
  half-precision torch op adds a Python scalar), so ``eps * k^2`` is never flushed on its own.
* **off switch**: each norm op module has a ``fp16_input_scaling`` flag (``True`` after ``prepare``);
  :func:`set_fp16_norm_scaling` flips it for a model or a name prefix. Like the fake-quant state it is a
  runtime setting, not a ``state_dict`` entry.

Covered ops: ``nn.LayerNorm``, ``nn.GroupNorm``, ``F.layer_norm`` and ``F.group_norm`` (fx). Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState
from qat_lightning.quant.nodes.functional import fake_cast
from qat_lightning.quant.nodes.qat_modules import QatFunction, QatModuleOp
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch
from qat_lightning.quant.op_names import match_name
from qat_lightning.quant.ops import iter_quant_ops

__all__ = [
    "SAFE_AMAX",
    "NORM_MODULES",
    "NORM_FUNCTIONS",
    "QatNormOp",
    "QatNormFunction",
    "norm_input_scale",
    "fp16_layer_norm",
    "fp16_group_norm",
    "fp16_active",
    "set_fp16_norm_scaling",
]

SAFE_AMAX = 64.0
"""Largest ``max|k x|`` after scaling: ``(2 * 64)^2 = 16384`` stays well inside fp16 (65504)."""

NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)
"""Module norm ops that get the fp16 simulation and automatic input scaling."""

NORM_FUNCTIONS: dict[Callable[..., Tensor], str] = {
    F.layer_norm: "normalized_shape",
    F.group_norm: "num_groups",
}
"""Functional norm ops (fx) -> the name of their second argument."""

Cast = Callable[[Tensor], Tensor]


def norm_input_scale(x: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """Return the power-of-two input factor ``k = min(1, 2^-ceil(log2(max|x| / SAFE_AMAX)))``.

    ``max|x|`` ignores nothing: an all-zero input gives ``k = 1``; NaN propagates. No gradient.

    Args:
        x: the norm's input.
        dims: the dims normalized together (one factor per group, shaped to broadcast over ``x``);
            ``None``: one factor for the whole tensor (0-d).

    Returns:
        ``k`` as float32.
    """
    with torch.no_grad():
        a = x.detach().abs()
        amax = (a.amax() if dims is None else a.amax(dims, keepdim=True)).float()
        return torch.exp2(-torch.ceil(torch.log2(amax / SAFE_AMAX))).clamp(max=1.0)


def _normalize(xs: Tensor, dims: tuple[int, ...], eps: float, cast: Cast) -> Tensor:
    """``(xs - mean) * rsqrt(var + eps)`` over ``dims``, every intermediate passed through ``cast``."""
    mean = cast(xs.mean(dims, keepdim=True))
    d = cast(xs - mean)
    var = cast(cast(d * d).mean(dims, keepdim=True))
    rstd = cast(torch.rsqrt(cast(var + eps)))
    return cast(d * rstd)


def _scaled_input(
    x: Tensor, dims: tuple[int, ...], auto_scale: bool, cast: Cast
) -> tuple[Tensor, Tensor | float]:
    """Return the input as the op sees it (``cast(x)``, times ``k`` when scaling) and ``k``.

    ``k`` is one factor per group normalized over ``dims`` (see the module docstring).
    """
    x = cast(x)
    if not auto_scale:
        return x, 1.0
    k = norm_input_scale(x, dims).to(x.dtype)
    return cast(x * k), k


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, cast: Cast) -> Tensor:
    if weight is not None:
        y = cast(y * cast(weight))
    if bias is not None:
        y = cast(y + cast(bias))
    return y


def fp16_layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int] | int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    auto_scale: bool = True,
    cast: Cast = fake_cast,
) -> Tensor:
    """``F.layer_norm`` computed step by step in fp16 (``cast``), optionally with automatic input scaling.

    Args:
        x: input.
        normalized_shape: the trailing shape normalized over (as ``F.layer_norm``).
        weight: elementwise scale or ``None``.
        bias: elementwise shift or ``None``.
        eps: added to the variance (``eps * k^2`` when scaled).
        auto_scale: multiply the input by :func:`norm_input_scale` first (one factor per row).
        cast: applied to every intermediate; ``fake_cast`` simulates fp16, an identity gives the exact
            formula (used to verify the scaling in float64).

    Returns:
        The normalized tensor, shaped like ``x``.
    """
    ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-ndim, 0))
    xs, k = _scaled_input(x, dims, auto_scale, cast)
    y = _normalize(xs, dims, eps * k * k, cast)
    return _affine(y, weight, bias, cast)


def fp16_group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    auto_scale: bool = True,
    cast: Cast = fake_cast,
) -> Tensor:
    """``F.group_norm`` computed step by step in fp16; arguments as :func:`fp16_layer_norm`.

    ``weight`` and ``bias`` are per channel (dim 1); the input factor is one per group of each sample.
    """
    n, c = x.shape[0], x.shape[1]
    xs, k = _scaled_input(x.reshape(n, num_groups, -1), (-1,), auto_scale, cast)
    y = _normalize(xs, (-1,), eps * k * k, cast).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    w = None if weight is None else weight.reshape(shape)
    b = None if bias is None else bias.reshape(shape)
    return _affine(y, w, b, cast)


def fp16_active(node: FakeQuantize | None) -> bool:
    """Whether an op whose output node is ``node`` runs in simulated fp16 now (float16, fake cast active)."""
    return (
        node is not None
        and node.dtype.is_float16
        and node.state in (FakeQuantState.QAT, FakeQuantState.VALIDATION)
        and GlobalFakeQuantSwitch._enabled
        and FakeCastSwitch._enabled
    )


class QatNormOp(QatModuleOp):
    """``nn.LayerNorm`` / ``nn.GroupNorm`` op: the float module, or its fp16 simulation when fp16 is active.

    Attributes:
        fp16_input_scaling: automatic input scaling in fp16 (default ``True``).
    """

    fp16_input_scaling: bool = True  # class default; set per op by set_fp16_norm_scaling

    def _forward(self, x: Tensor) -> Tensor:
        m = self.module
        if not fp16_active(self.output_quant):
            return super()._forward(x)
        if isinstance(m, nn.GroupNorm):
            y = fp16_group_norm(x, m.num_groups, m.weight, m.bias, m.eps, self.fp16_input_scaling)
        else:
            y = fp16_layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps, self.fp16_input_scaling)
        return self._out(y)

    def extra_repr(self) -> str:
        """Show name, type and the scaling flag."""
        return f"{super().extra_repr()}, fp16_input_scaling={self.fp16_input_scaling}"


class QatNormFunction(QatFunction):
    """``F.layer_norm`` / ``F.group_norm`` op: as :class:`QatNormOp`, for the functional form (fx).

    Attributes:
        fp16_input_scaling: automatic input scaling in fp16 (default ``True``).
    """

    fp16_input_scaling: bool = True  # class default; set per op by set_fp16_norm_scaling

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if not fp16_active(self.output_quant):
            return super()._forward(*args, **kwargs)
        names = ("input", NORM_FUNCTIONS[self.target], "weight", "bias", "eps")
        values = [*args, *(None, None, None, None, 1e-5)[len(args) :]]
        values = [kwargs.get(n, v) for n, v in zip(names, values, strict=True)]
        fn = fp16_group_norm if self.target is F.group_norm else fp16_layer_norm
        return self._out(fn(*values, auto_scale=self.fp16_input_scaling))

    def extra_repr(self) -> str:
        """Show name, type, function and the scaling flag."""
        return f"{super().extra_repr()}, fp16_input_scaling={self.fp16_input_scaling}"


def set_fp16_norm_scaling(model: nn.Module, enabled: bool, prefix: str = "") -> list[str]:
    """Turn automatic fp16 input scaling of norm ops on or off.

    Args:
        model: a prepared model.
        enabled: the new setting.
        prefix: only ops matched by this pattern (:func:`~qat_lightning.quant.op_names.match_name`:
            a prefix on name components, ``""`` for all, or a glob).

    Returns:
        The names of the norm ops that were set.
    """
    names = []
    for name, op in iter_quant_ops(model):
        if isinstance(op, (QatNormOp, QatNormFunction)) and match_name(prefix, name):
            op.fp16_input_scaling = bool(enabled)
            names.append(name)
    return names
