"""Functional fake quantization and fake cast with a straight-through gradient; device-neutral.

``fake_quantize`` computes ``clamp(round(x * (1 / scale)), qmin, qmax) * scale`` (symmetric, zero point 0,
round half to even), exactly as ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` do:
``1 / scale`` is rounded to float32 first and ``x`` is multiplied by it. The gradient passes where
``qmin - 0.5 <= x * (1 / scale) < qmax + 0.5`` and is zero where the value was clipped (and at a NaN
input). The backward recomputes ``x * (1 / scale)`` from the saved input and applies
``aten.hardtanh_backward`` (a NaN gradient arriving at a clipped element gives 0 there, as torch's
``hardtanh`` backward and the ``cpu_kernels`` backend do); no boolean mask is built or kept. That halves
the eager forward + backward of a node against a kept mask (benchmarks/README.md, "QAT step"); memory:
the node keeps its float32 input for backward instead of a bool mask (as ModelOpt's node does). Traced
(``torch.compile``), the backward multiplies by a ``uint8`` 0/1 mask built with float arithmetic
(:func:`_keep_mask`), which inductor computes in the forward and keeps: one byte per element (a float mask
kept 4; a boolean one was stored element by element).

:func:`quantize_tensor` is what every quant node runs. It takes the scale as a float32 tensor, so
nothing is read back to the host, and runs the same ATen formula (an ``autograd.Function``: multiply,
round, clamp, multiply; the input kept for backward) in eager mode, under ``torch.compile`` (inductor
fuses it into one loop), ``torch.export`` and on ``meta`` tensors. torch's fused ops
(``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``) give the same values and gradients
for finite inputs (tested bit for bit) but are not used: they have no fake (meta) kernel, so they cannot be
compiled or exported, the per-tensor one turns NaN into ``qmin * scale`` (a diverging run would go on
silently) and the per-channel one wraps ``inf`` to the wrong end. Measured in eager mode on this CPU the
formula is at least as fast as the fused op (its cachemask variant took twice as long forward +
backward, ``benchmarks/README.md``). With the opt-in ``cpu_kernels`` backend
(:mod:`qat_lightning.quant.backends`) a float32 CPU tensor goes through a fused C kernel instead (a custom
op; same values) in eager mode; traced (``torch.compile``, ``torch.export``) the node runs the formula
whatever the backend, since inductor fuses it with its neighbours and the opaque op measured slower there
(benchmarks/README.md, "QAT step").

float16/bfloat16 inputs are computed in float32 and returned in their own dtype; the scale stays float32;
backward keeps the half-precision input itself (2 bytes per element), not a float32 copy of it.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from numbers import Real
from types import ModuleType

import torch
from torch import Tensor

from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype

__all__ = ["fake_quantize", "fake_cast", "quantize_tensor", "lsq_quantize", "FP16_MAX", "load_extension"]

FP16_MAX = float(torch.finfo(torch.float16).max)

_BACKEND_HOOK: list[Callable[[Tensor, Tensor, int, int, int | None], Tensor | None]] = []
"""The selected opt-in backend's fake quant (at most one; see ``qat_lightning.quant.backends``)."""


def load_extension(name: str) -> ModuleType | None:
    """Import the optional C extension ``qat_lightning.quant.backends.<name>`` (built by ``setup.py``).

    ``None`` when it was not built (no compiler) or ``QAT_LIGHTNING_NO_KERNELS`` is set (not ``0``).
    """
    if os.environ.get("QAT_LIGHTNING_NO_KERNELS", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"qat_lightning.quant.backends.{name}")
    except ImportError:
        return None


def _scale_view(scale: Tensor, x: Tensor, ch_axis: int | None) -> Tensor:
    """Reshape a per-channel scale so it broadcasts along ``ch_axis`` of ``x``."""
    if ch_axis is None:
        return scale if scale.dim() == 0 else scale.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.reshape(shape)


def _lower_keep_bound(qmin: int) -> float:
    """Return the float32 just below ``qmin - 0.5`` (``v > bound`` is exactly ``v >= qmin - 0.5``).

    Plain integer arithmetic (traced as a constant by dynamo): ``qmin - 0.5 = ±m / 2`` with ``m`` odd, so its
    float32 spacing is ``2 ** (m.bit_length() - 25)`` (half that just below ``+0.5``).
    """
    m = abs(2 * qmin - 1)
    if qmin == 1:
        return 0.5 - 2.0**-25
    return qmin - 0.5 - 2.0 ** (m.bit_length() - 25)


def _times(x: Tensor, inv: Tensor) -> Tensor:
    """``x * inv`` in float32 (a half-precision ``x`` is converted first; ``inv`` is float32)."""
    return x * inv if x.dtype == torch.float32 else x.float().mul_(inv)


class _FakeQuantizeFormula(torch.autograd.Function):
    """The ATen formula with a straight-through gradient (compile, export and meta tensors).

    Forward: four element-wise passes (multiply, round, clamp, multiply; three in place) and nothing
    but ``x`` kept for backward. Backward recomputes ``v = x * (1 / scale)`` and passes the gradient where
    ``qmin - 0.5 <= v < qmax + 0.5`` with ``aten.hardtanh_backward`` (one fused pass; its strict bounds are
    the float32 below ``qmin - 0.5`` and ``qmax + 0.5``; NaN is first mapped outside the range): no boolean
    mask is built in the forward. Saving ``x`` (float) instead of a mask is what ModelOpt does too.
    A sparse COO gradient (``nn.Embedding(sparse=True)`` behind the table's node) stays sparse: the rule is
    applied to its values only, at its indices (:func:`_sparse_backward`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:  # noqa: D102
        inv = scale.reciprocal()
        v = _times(x, inv)  # a half-precision x is kept for backward as is: 2 bytes per element
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, inv)
            ctx.bounds = (_lower_keep_bound(qmin), qmax + 0.5)
        return v.round_().clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # noqa: D102
        x, inv = ctx.saved_tensors
        lo, hi = ctx.bounds
        if grad.is_sparse:
            return _sparse_backward(grad, x, inv, lo, hi), None, None, None
        v = _times(x, inv)  # the gradient is float32: autograd casts it back to x's dtype
        if torch.compiler.is_compiling():
            return grad * _keep_mask(v, lo, hi), None, None, None
        v.nan_to_num_(nan=hi)  # a NaN input gets no gradient (as the fused torch op)
        if grad.dtype != v.dtype or grad.shape != v.shape:
            return torch.ops.aten.hardtanh_backward(grad, v, lo, hi), None, None, None
        return torch.ops.aten.hardtanh_backward.grad_input(grad, v, lo, hi, grad_input=v), None, None, None


def _sparse_backward(grad: Tensor, x: Tensor, inv: Tensor, lo: float, hi: float) -> Tensor:
    """Apply the straight-through rule to a sparse COO ``grad``: its values, at its indices; still sparse.

    Only the ``nnz`` entries the gradient holds are read from ``x`` (an embedding table's looked-up rows,
    not the whole table); the result equals the dense rule applied to ``grad.to_dense()``, NaN handling
    included. The gradient is coalesced first (duplicate indices summed, as ``to_dense`` would).

    Args:
        grad: sparse COO gradient shaped like ``x`` (sparse dims first, then dense dims).
        x: the saved input.
        inv: ``1 / scale``, broadcastable to ``x``.
        lo: the float32 just below ``qmin - 0.5``.
        hi: ``qmax + 0.5``.
    """
    grad = grad.coalesce()
    where = tuple(grad.indices())
    v = _times(x[where], inv.expand(x.shape)[where])  # (nnz, *dense dims)
    v.nan_to_num_(nan=hi)
    values = torch.ops.aten.hardtanh_backward(grad.values(), v, lo, hi)
    return torch.sparse_coo_tensor(grad.indices(), values.to(grad.dtype), grad.shape, is_coalesced=True)


def _keep_mask(v: Tensor, lo: float, hi: float) -> Tensor:
    """``uint8`` 1 where ``lo < v < hi``, else 0 (NaN: 0), by float arithmetic (the traced backward).

    The sign of a difference of two floats is exact and ``2 ** 126`` lifts the smallest nonzero one to at
    least 1, so the clamps give exactly 0 or 1; NaN is mapped to 0 (no gradient, as in eager mode) by a
    ``where``, which inductor vectorizes (``nan_to_num`` made the compiled node 25-50 % slower). Inductor
    computes the mask in the forward and keeps it for backward: one byte per element. A float mask kept
    four; a boolean one was stored element by element on CPU (measured ~13x slower than a float store).
    """
    keep = ((v - lo) * 2.0**126).clamp(0.0, 1.0) * ((hi - v) * 2.0**126).clamp(0.0, 1.0)
    return torch.where(keep == keep, keep, 0.0).to(torch.uint8)


def quantize_tensor(x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int | None = None) -> Tensor:
    """Fake-quantize ``x`` with a float32 ``scale`` tensor (shape ``()`` or ``(channels,)``); no host sync.

    Args:
        x: float tensor of any dtype and device (half precision is computed in float32).
        scale: positive float32 scale(s) on ``x``'s device.
        qmin: lowest integer code.
        qmax: highest integer code.
        ch_axis: channel axis of a per-channel scale, ``None`` for one scale.

    Returns:
        The fake-quantized tensor in ``x``'s dtype; straight-through gradient inside the range.

    Raises:
        ValueError: when ``x.shape[ch_axis]`` is not the number of per-channel scales.
    """
    if ch_axis is not None:
        _check_scale(scale, x, ch_axis)  # shapes only (no sync): a wrong channel count must not broadcast
    dtype = x.dtype
    out = None
    if _BACKEND_HOOK and dtype == torch.float32 and not torch.compiler.is_compiling():
        out = _BACKEND_HOOK[0](x, scale, qmin, qmax, ch_axis)  # eager only (traced: the formula)
    if out is None:
        out = _FakeQuantizeFormula.apply(x, _scale_view(scale, x, ch_axis), qmin, qmax)
    return out if dtype == torch.float32 else out.to(dtype)


def _check_scale(scale: Tensor, x: Tensor, ch_axis: int | None) -> None:
    """Check the scale's shape against ``x`` and ``ch_axis`` (shapes and types only: no host sync).

    Raises:
        TypeError: when ``ch_axis`` is not an int or ``None``.
        ValueError: for a channel axis out of range or a scale count that does not match.
    """
    if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
        raise TypeError(f"ch_axis must be an int (the channel axis) or None, got {ch_axis!r}")
    if ch_axis is None:
        if scale.numel() != 1:
            raise ValueError(f"per-tensor fake quant needs one scale, got shape {tuple(scale.shape)}")
        return
    if not -x.dim() <= ch_axis < x.dim():
        raise ValueError(f"ch_axis={ch_axis} is out of range for a {x.dim()}-d tensor")
    if scale.numel() != x.shape[ch_axis]:
        raise ValueError(
            f"per-channel fake quant: the tensor has {x.shape[ch_axis]} channels along axis {ch_axis} "
            f"(shape {tuple(x.shape)}) but there are {scale.numel()} scales"
        )


def _scale_tensor(scale: Tensor | float, device: torch.device) -> Tensor:
    """Return ``fake_quantize``'s scale as float32 on ``device``, its values checked where that is free.

    A Python number and a CPU tensor are checked (finite and > 0 as float32); a tensor elsewhere, or
    while ``torch.compile`` traces, is not (no host sync, no graph break).
    """
    if isinstance(scale, Tensor):
        scale_t = scale.detach().to(torch.float32) if scale.device.type == "cpu" else None
        if scale_t is not None and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(scale_t).all() and (scale_t > 0).all()):
                shown = scale_t.reshape(-1)[:8].tolist()
                raise ValueError(f"fake_quantize: scale must be finite and > 0 everywhere, got {shown}")
        return scale.to(dtype=torch.float32, device=device)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(
            f"fake_quantize: scale must be a number or a tensor, got {type(scale).__name__} {scale!r}"
        )
    value = float(scale)  # plain Python: no tensor, nothing traced
    if not (math.isfinite(value) and _FP32_TINIEST <= value <= _FP32_MAX):  # 0 or inf as float32 otherwise
        raise ValueError(f"fake_quantize: scale must be a finite number > 0 (as float32), got {scale!r}")
    return torch.tensor(value, dtype=torch.float32, device=device)


_FP32_TINIEST = 2.0**-149  # the smallest positive float32 (subnormal)
_FP32_MAX = float(torch.finfo(torch.float32).max)


def fake_quantize(
    x: Tensor, scale: Tensor | float, dtype: DtypeLike = "qint8", ch_axis: int | None = None
) -> Tensor:
    """Symmetric fake quantization ``clamp(round(x / scale), qmin, qmax) * scale``.

    Args:
        x: float tensor.
        scale: one scale (float or tensor) for per-tensor, or a 1-d tensor with ``x.shape[ch_axis]``
            entries for per-channel quantization. Must be finite and positive as float32 (how it is
            used). A Python number is checked; so is a CPU tensor (outside ``torch.compile``). A tensor
            on another device (CUDA) is not: reading its values would make the host wait for the
            device, and a quant node's scale (``quantize_tensor``) is never read back either.
        dtype: ``qint8``/``qint16`` quantize; ``float16`` fake-casts (scale ignored); ``float32`` returns
            ``x`` unchanged.
        ch_axis: channel axis for per-channel scales, ``None`` for per-tensor.

    Returns:
        A tensor like ``x``. Gradient: straight-through inside the range, zero where clipped.

    Raises:
        ValueError: for an unknown dtype, a scale whose size does not match, or a checked scale that is
            zero, negative, NaN or infinite.
        TypeError: for an ``x`` that is not a tensor, a scale that is neither a number nor a tensor, or a
            ``ch_axis`` that is not an int.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"fake_quantize: x must be a tensor, got {type(x).__name__}")
    qdtype: QuantDtype = parse_dtype(dtype)
    if qdtype.is_float32:
        return x
    if qdtype.is_float16:
        return fake_cast(x)
    scale_t = _scale_tensor(scale, x.device)
    _check_scale(scale_t, x, ch_axis)
    scale_t = scale_t.reshape(()) if ch_axis is None else scale_t.reshape(-1)
    return quantize_tensor(x, scale_t, qdtype.qmin, qdtype.qmax, ch_axis)


def _round_to_float16(x: Tensor) -> Tensor:
    """``x`` rounded to float16 (saturating at ±65504), in ``x``'s dtype; the clamp runs in float32.

    Traced, through an op of its own (:func:`_round_to_float16_op`): inductor drops a float32 -> float16 ->
    float32 round trip it can fuse (it keeps low-precision values in float32 registers), so the fused loop
    would not round at all.
    """
    if torch.compiler.is_compiling():
        return _round_to_float16_op(x)
    return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)  # bf16's 65504 rounds to inf


@torch.library.custom_op("qat_lightning::round_to_float16", mutates_args=())
def _round_to_float16_op(x: Tensor) -> Tensor:
    """:func:`_round_to_float16` as an opaque op (traced code)."""
    return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)


@_round_to_float16_op.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class _FakeCastSTE(torch.autograd.Function):
    """Round trip through float16, saturating at the fp16 max; identity gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return _round_to_float16(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


def fake_cast(x: Tensor) -> Tensor:
    """Round ``x`` to float16 precision and back, saturating at ±65504 instead of producing inf.

    NaN stays NaN. The gradient is the identity (straight-through). A float16 ``x`` is returned as is.
    """
    if x.dtype == torch.float16:
        return x
    return _FakeCastSTE.apply(x)


def lsq_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_factor: float) -> Tensor:
    """Fake quant with a learned per-tensor ``scale`` (LSQ / LSQ+ gradient; tensor ops, compile-safe).

    The value is :func:`quantize_tensor`'s (``clamp(round(x * (1 / s)), qmin, qmax) * s``). Gradients:
    ``x`` straight through inside the range (0 where clipped); ``scale``: ``round(x / s) - x / s`` inside
    the range and ``qmin`` / ``qmax`` where clipped, times ``grad_factor`` (LSQ uses
    ``1 / sqrt(numel * qmax)``) -- Esser et al., "Learned Step Size Quantization", ICLR 2020.

    Args:
        x: float tensor (half precision is computed in float32 and returned in its dtype).
        scale: positive float32 scalar tensor (a parameter).
        qmin: lowest integer code.
        qmax: highest integer code.
        grad_factor: multiplier of the scale's gradient.
    """
    dtype = x.dtype
    xf = x if dtype == torch.float32 else x.float()
    s = scale.reshape(())
    sg = s * grad_factor
    s = s.detach() + (sg - sg.detach())  # exactly the value s; gradient scaled by grad_factor
    v = xf * s.reciprocal()
    v = (v.round() - v).detach() + v  # round with a straight-through gradient
    out = v.clamp(qmin, qmax) * s
    return out if dtype == torch.float32 else out.to(dtype)
