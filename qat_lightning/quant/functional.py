"""Functional fake quantization and fake cast with a straight-through gradient.

``fake_quantize`` computes ``clamp(round(x / scale), qmin, qmax) * scale`` (symmetric, zero point 0, round
half to even, true division). The gradient passes where ``qmin - 0.5 < x / scale < qmax + 0.5`` and is zero
where the value was clipped.

Two implementations give the same values (tested bit for bit):

* **fused C kernels** (``_kernels.c``, built by ``setup.py`` at install; ``kernels_available()``): for
  contiguous float32 CPU tensors. The forward is one pass that writes the result and a one-byte gradient
  mask; the backward is one pass ``grad * mask``. So QAT keeps one byte per element for the backward
  instead of the float32 input, and each direction touches memory once. Large tensors are split over
  ``torch.get_num_threads()`` threads. ``QAT_LIGHTNING_NO_KERNELS=1`` switches them off.
* **ATen formulas** for everything else (other dtypes or devices, non-contiguous tensors, no compiler):
  four elementwise passes (divide, round, clamp, multiply) forward and one ``hardtanh_backward`` backward
  that recomputes the mask from the saved input. With one intra-op thread, large contiguous CPU tensors
  run block by block (``_BLOCK`` elements) while a block sits in the L2 cache, and the per-channel
  backward computes ``x / scale`` per block into one reused buffer; same operations, same results. With
  several threads the one-shot formulas are used (many short parallel regions stall when another
  process holds a core).

Agreement with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``: the forward values are
identical except where ``x / scale`` is computed differently in the last bit (torch multiplies by
``1 / scale``, we divide), which can only move a value that sits on an exact rounding tie (``k + 0.5``).
The gradient mask differs only on the two exact boundary ties ``x / scale == qmin - 0.5`` (torch: passes,
here: zero) — both are measure-zero sets, documented and tested.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype

__all__ = ["fake_quantize", "fake_cast", "FP16_MAX", "kernels_available"]


def _load_kernels():  # noqa: ANN202 - an extension module or None
    """Import the compiled fused kernels (``setup.py``); ``None`` without a compiler or when disabled."""
    if os.environ.get("QAT_LIGHTNING_NO_KERNELS", "") not in ("", "0"):
        return None
    try:
        from qat_lightning.quant import _kernels
    except ImportError:
        return None
    return _kernels


_KERNELS = _load_kernels()


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


_BLOCK = 1 << 17
"""Elements per block of the blockwise CPU paths (512 KiB of float32 stay in an L2 cache)."""


def _block_size() -> int:
    """Elements per block (a function so tests can shrink it)."""
    return _BLOCK


def _blockwise_ok(x: Tensor, scale: Tensor, *others: Tensor) -> bool:
    """Whether fake quant of ``x`` runs block by block (one thread, large contiguous CPU tensor, one axis)."""
    return (
        x.device.type == "cpu"
        and torch.get_num_threads() == 1
        and x.numel() >= 4 * _block_size()
        and scale.device.type == "cpu"
        and scale.dtype == x.dtype
        and x.is_contiguous()
        and sum(size != 1 for size in scale.shape) <= 1
        and all(t.dtype == x.dtype and t.shape == x.shape and t.is_contiguous() for t in others)
    )


def _blocks(
    x: Tensor, scale: Tensor
) -> tuple[tuple[int, int, int], int, list[tuple[tuple[slice, ...], Tensor]]]:
    """Split ``x`` into blocks of about ``_block_size()`` elements along its channel structure.

    ``x`` is viewed as ``(outer, channels, inner)`` around the axis along which ``scale`` varies
    (``(numel, 1, 1)`` for one scale). Returns that 3-d shape, the block size (no block is larger) and
    the blocks as ``(index into the 3-d view, the matching scale)``: a ``(channels, 1)`` slice, or the
    scale as a 0-d tensor when it is one.
    """
    block = _block_size()
    axes = [d for d, size in enumerate(scale.shape) if size != 1]
    if not axes:  # one scale: plain rows of the flattened tensor
        numel = x.numel()
        s0 = scale.reshape(())
        return (numel, 1, 1), block, [((slice(a, a + block),), s0) for a in range(0, numel, block)]
    axis = axes[0]
    channels = x.shape[axis]
    outer = 1
    for size in x.shape[:axis]:
        outer *= size
    inner = x.numel() // (outer * channels)
    s2 = scale.reshape(channels, 1)
    whole = slice(None)
    blocks: list[tuple[tuple[slice, ...], Tensor]] = []
    if channels * inner <= block:  # several rows of all channels
        rows = block // (channels * inner)
        blocks = [((slice(o, o + rows), whole, whole), s2) for o in range(0, outer, rows)]
    elif inner <= block:  # a group of channels of one row
        group = block // inner
        blocks = [
            ((slice(o, o + 1), slice(c, c + group), whole), s2[c : c + group])
            for o in range(outer)
            for c in range(0, channels, group)
        ]
    else:  # a piece of one channel
        blocks = [
            ((slice(o, o + 1), slice(c, c + 1), slice(i, i + block)), s2[c : c + 1])
            for o in range(outer)
            for c in range(channels)
            for i in range(0, inner, block)
        ]
    return (outer, channels, inner), block, blocks


def _fake_quantize_blockwise(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """``torch.div(x, scale).round_().clamp_(qmin, qmax).mul_(scale)``, one cache-sized block at a time."""
    out = torch.empty_like(x)
    shape3, _, blocks = _blocks(x, scale)
    x3, o3 = x.view(shape3), out.view(shape3)
    for index, s in blocks:
        torch.div(x3[index], s, out=o3[index]).round_().clamp_(qmin, qmax).mul_(s)
    return out


def _fake_quantize_grad_blockwise(grad: Tensor, x: Tensor, scale: Tensor, lo: float, hi: float) -> Tensor:
    """``hardtanh_backward(grad, x / scale, lo, hi)`` without a full-size ``x / scale`` temporary."""
    out = torch.empty_like(grad)
    shape3, block, blocks = _blocks(x, scale)
    x3, g3, o3 = x.view(shape3), grad.view(shape3), out.view(shape3)
    buf = torch.empty(block, dtype=x.dtype)  # every block has at most ``block`` elements
    hardtanh_backward = torch.ops.aten.hardtanh_backward.grad_input
    for index, s in blocks:
        xb = x3[index]
        tmp = torch.div(xb, s, out=buf[: xb.numel()].view(xb.shape))
        hardtanh_backward(g3[index], tmp, lo, hi, grad_input=o3[index])
    return out


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


def _kernel_forward(x: Tensor, scale: Tensor, qmin: int, qmax: int, shape: tuple[int, int, int], mask: bool):
    """Run the fused forward kernel: the fake-quantized tensor and the uint8 gradient mask (or ``None``)."""
    out = torch.empty_like(x)
    keep = torch.empty(x.shape, dtype=torch.uint8) if mask else None
    _KERNELS.fake_quantize_forward(
        x.data_ptr(),
        out.data_ptr(),
        0 if keep is None else keep.data_ptr(),
        scale.data_ptr(),
        *shape,
        float(qmin),
        float(qmax),
        torch.get_num_threads(),
    )
    return out, keep


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quant forward; straight-through gradient inside the quantization range."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:  # noqa: D102
        shape = _kernel_shape(x, scale)
        if shape is not None:
            out, keep = _kernel_forward(x, scale, qmin, qmax, shape, ctx.needs_input_grad[0])
            ctx.save_for_backward(keep)
            ctx.qrange = None
            return out
        ctx.save_for_backward(x, scale)
        ctx.qrange = (qmin, qmax)
        if _blockwise_ok(x, scale):
            return _fake_quantize_blockwise(x, scale, qmin, qmax)
        return torch.div(x, scale).round_().clamp_(qmin, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.qrange is None:
            return _masked_grad(grad, ctx.saved_tensors[0]), None, None, None
        x, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        if scale.numel() == 1 and scale.device.type == "cpu":
            s = float(scale)
            lo, hi, target = (qmin - 0.5) * s, (qmax + 0.5) * s, x
        elif _blockwise_ok(x, scale, grad):
            return _fake_quantize_grad_blockwise(grad, x, scale, qmin - 0.5, qmax + 0.5), None, None, None
        else:  # per-channel (or a device scale): compare x / scale against the integer bounds
            lo, hi, target = qmin - 0.5, qmax + 0.5, torch.div(x, scale)
        return torch.ops.aten.hardtanh_backward(grad, target, lo, hi), None, None, None


def _masked_grad(grad: Tensor, keep: Tensor) -> Tensor:
    """``grad`` where the kernel's mask is set, 0 elsewhere (the fused backward kernel when it applies)."""
    if (
        grad.dtype != torch.float32
        or grad.device.type != "cpu"
        or grad.shape != keep.shape
        or not grad.is_contiguous()
    ):  # one strided pass (a copy to contiguous first costs more); 0 * inf would be NaN here
        return grad * keep
    out = torch.empty_like(grad)
    _KERNELS.fake_quantize_backward(
        grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads()
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
