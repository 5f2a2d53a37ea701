"""Functional fake quantization and fake cast with a straight-through gradient.

``fake_quantize`` computes ``clamp(round(x * (1 / scale)), qmin, qmax) * scale`` (symmetric, zero point 0,
round half to even), exactly as ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` do:
``1 / scale`` is rounded to the tensor's dtype first and ``x`` is multiplied by it. The results (values and
gradients) are therefore bit-identical to torch's builtins (tested, exact ties included). Against the exact
quotient ``x / scale`` the code can differ by one step only where ``x / scale`` lies within about one ulp
of a rounding tie ``k + 0.5`` (the product and the quotient differ in the last bit).

The gradient passes where ``qmin <= round(x * (1 / scale)) <= qmax`` (both integer ranges have an even
``qmin``, so: ``qmin - 0.5 <= x * (1 / scale) < qmax + 0.5``) and is zero where the value was clipped.

Two implementations give the same values (tested bit for bit):

* **fused C kernels** (``_kernels.c``, built by ``setup.py`` at install; ``kernels_available()``): for
  contiguous float32 CPU tensors. The forward is one pass that writes the result and the gradient mask
  (one bit per element with one scale, one byte per element per channel); the backward is one pass
  ``grad * mask``. So QAT keeps 1/32 (or 1/4) of the activation for the backward instead of the float32
  input, and each direction touches memory once. When a per-tensor mask has no zero (nothing clipped)
  it is not kept at all and the backward returns the upstream gradient itself. Large tensors are split over
  ``torch.get_num_threads()`` threads. ``QAT_LIGHTNING_NO_KERNELS=1`` switches them off.
* **ATen formulas** for everything else (other dtypes or devices, non-contiguous tensors, no compiler):
  multiply, mask, round, clamp, multiply; the boolean mask is kept for the backward.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from qat_lightning.quant.backends.overwrite import exclusive_grad, grad_holders
from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype

__all__ = ["fake_quantize", "fake_cast", "FP16_MAX", "kernels_available"]


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


_KERNELS = load_extension("_kernels")


def kernels_available() -> bool:
    """Whether the fused C fake-quant kernels are in use (else the ATen formulas: same values, slower)."""
    return _KERNELS is not None


FP16_MAX = float(torch.finfo(torch.float16).max)


def _scale_view(scale: Tensor, x: Tensor, ch_axis: int | None) -> Tensor:
    """Reshape a per-channel scale so it broadcasts along ``ch_axis`` of ``x``."""
    if ch_axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.reshape(shape)


def _kernel_shape(x: Tensor, scale: Tensor) -> tuple[int, int, int] | None:
    """``(outer, channels, inner)`` for the fused kernel, or ``None`` when it does not apply to ``x``."""
    if (
        _KERNELS is None
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or scale.dtype != torch.float32
        or scale.device.type != "cpu"
        or not x.is_contiguous()
        or not scale.is_contiguous()
        or x.numel() == 0
    ):
        return None
    axes = [d for d, size in enumerate(scale.shape) if size != 1]
    if not axes:
        return x.numel(), 1, 1
    if len(axes) > 1 or scale.dim() != x.dim():
        return None
    axis = axes[0]
    outer = math.prod(x.shape[:axis])
    return outer, x.shape[axis], x.numel() // (outer * x.shape[axis])


def _kernel_forward(
    x: Tensor,
    scale: Tensor,
    qmin: int,
    qmax: int,
    shape: tuple[int, int, int],
    mask: bool,
    relu: bool,
    seen: list[float] | None = None,
    inplace: bool = False,
):
    """Run the fused forward kernel: the fake-quantized tensor and the uint8 gradient mask (or ``None``).

    One scale: the mask is bit-packed (``ceil(numel / 8)`` bytes) and dropped (``None``) when it has no
    zero bit, i.e. nothing was clipped: the gradient is then ``grad`` itself. Per channel: one byte per
    element. ``seen`` (one scale only) receives ``[min(x), max(x)]`` from the same pass (NaN for NaN/inf).
    ``inplace`` (one scale, with a mask): the result is written into ``x``, which is returned.
    """
    out = x if inplace and mask and shape[1] == 1 else torch.empty_like(x)
    keep = None
    if mask:
        keep = torch.empty((x.numel() + 7) // 8 if shape[1] == 1 else x.shape, dtype=torch.uint8)
    clipped = _KERNELS.fake_quantize_forward(
        x.data_ptr(),
        out.data_ptr(),
        0 if keep is None else keep.data_ptr(),
        scale.data_ptr(),
        *shape,
        float(qmin),
        float(qmax),
        relu,
        torch.get_num_threads(),
        seen is not None,
    )
    if seen is not None:
        clipped, lo, hi = clipped
        seen += (lo, hi)
    return out, keep if clipped else None


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quant forward; straight-through gradient inside the quantization range.

    ``relu=True``: ``x`` already holds ``max(x, 0)`` (applied in place without autograd by the caller) and
    the gradient mask also carries ReLU's ``x > 0``: the result and gradient of ``fake_quant(relu(x))``
    without ReLU's output kept for backward.

    ``seen``: an empty list that receives ``[min(x), max(x)]``, taken by the kernel in the same pass over
    ``x`` (it stays empty where the kernel does not apply). ``inplace``: the kernel may write the result
    into ``x`` (marked dirty), for a tensor nothing else holds (see :mod:`~..backends.overwrite`).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx,
        x: Tensor,
        scale: Tensor,
        qmin: int,
        qmax: int,
        relu: bool = False,
        seen: list[float] | None = None,
        inplace: bool = False,
    ) -> Tensor:
        need_mask = ctx.needs_input_grad[0]
        shape = _kernel_shape(x, scale)
        ctx.packed = shape is not None and shape[1] == 1
        if shape is not None:
            out, keep = _kernel_forward(x, scale, qmin, qmax, shape, need_mask, relu, seen, inplace)
            if out is x:
                ctx.mark_dirty(x)
        else:
            out, keep = _aten_forward(x, scale, qmin, qmax, need_mask, relu)
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        (keep,) = ctx.saved_tensors
        if keep is None:  # nothing clipped: the straight-through gradient is the identity
            return grad, None, None, None, None, None, None
        # the masked gradient goes into `grad` itself when nothing else holds it (see quant.overwrite)
        inplace = ctx.packed and exclusive_grad(grad_holders(grad))
        return _masked_grad(grad, keep, ctx.packed, inplace), None, None, None, None, None, None


def _aten_forward(
    x: Tensor, scale: Tensor, qmin: int, qmax: int, mask: bool, relu: bool
) -> tuple[Tensor, Tensor | None]:
    """Compute with ATen ops: the fake-quantized tensor and the boolean gradient mask (or ``None``)."""
    v = torch.mul(x, scale.reciprocal())
    keep = None
    if mask:
        keep = (x > 0) if relu else (v >= qmin - 0.5)
        keep.logical_and_(v < qmax + 0.5)
    return v.round_().clamp_(qmin, qmax).mul_(scale), keep


def _masked_grad(grad: Tensor, keep: Tensor, packed: bool, inplace: bool = False) -> Tensor:
    """``grad`` where the forward's mask is set, 0 elsewhere (the fused backward kernel when it applies).

    ``inplace`` (a bit mask): write the result into ``grad``, which nothing else holds.
    """
    if packed:
        return _kernel_backward(grad.float().contiguous(), keep, True, inplace)
    if (
        keep.dtype != torch.uint8  # a boolean mask from the ATen formulas
        or grad.dtype != torch.float32
        or grad.device.type != "cpu"
        or not grad.is_contiguous()
    ):  # one strided pass (a copy to contiguous first costs more); 0 * inf would be NaN here
        return grad * keep
    return _kernel_backward(grad, keep, False)


def _kernel_backward(grad: Tensor, keep: Tensor, packed: bool, inplace: bool = False) -> Tensor:
    """Run the fused backward kernel on a contiguous float32 ``grad`` (``packed``: a bit mask).

    ``inplace``: the result goes into ``grad``.
    """
    out = grad if inplace else torch.empty_like(grad)
    _KERNELS.fake_quantize_backward(
        grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(), packed, torch.get_num_threads()
    )
    return out


def _check_scale(scale: Tensor, x: Tensor, ch_axis: int | None) -> None:
    if ch_axis is None:
        if scale.numel() != 1:
            raise ValueError(f"per-tensor fake quant needs one scale, got shape {tuple(scale.shape)}")
        return
    if not -x.dim() <= ch_axis < x.dim():
        raise ValueError(f"ch_axis={ch_axis} is out of range for a {x.dim()}-d tensor")
    if scale.numel() != x.shape[ch_axis]:
        raise ValueError(
            f"per-channel fake quant needs {x.shape[ch_axis]} scales along axis {ch_axis}, "
            f"got {scale.numel()}"
        )


def fake_quantize(
    x: Tensor, scale: Tensor | float, dtype: DtypeLike = "qint8", ch_axis: int | None = None
) -> Tensor:
    """Symmetric fake quantization ``clamp(round(x / scale), qmin, qmax) * scale``.

    Args:
        x: float tensor.
        scale: one scale (float or tensor) for per-tensor, or a 1-d tensor with ``x.shape[ch_axis]``
            entries for per-channel quantization. Must be positive.
        dtype: ``qint8``/``qint16`` quantize; ``float16`` fake-casts (scale ignored); ``float32`` returns
            ``x`` unchanged.
        ch_axis: channel axis for per-channel scales, ``None`` for per-tensor.

    Returns:
        A tensor like ``x``. Gradient: straight-through inside the range, zero where clipped.

    Raises:
        ValueError: for an unknown dtype or a scale whose size does not match.
    """
    qdtype: QuantDtype = parse_dtype(dtype)
    if qdtype.is_float32:
        return x
    if qdtype.is_float16:
        return fake_cast(x)
    scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    _check_scale(scale_t, x, ch_axis)
    return _FakeQuantizeSTE.apply(x, _scale_view(scale_t, x, ch_axis), qdtype.qmin, qdtype.qmax)


class _FakeCastSTE(torch.autograd.Function):
    """float32 -> float16 -> float32 round trip, saturating at the fp16 max; identity gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


def fake_cast(x: Tensor) -> Tensor:
    """Round ``x`` to float16 precision and back, saturating at ±65504 instead of producing inf.

    NaN stays NaN. The gradient is the identity (straight-through).
    """
    if x.dtype == torch.float16:
        return x
    return _FakeCastSTE.apply(x)
