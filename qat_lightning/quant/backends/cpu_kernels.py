"""The opt-in CPU backend ``cpu_kernels``: the fused C fake-quant kernels as ``torch.library`` custom ops.

``_kernels.c`` (built by ``setup.py`` when a C compiler is there) fake-quantizes a contiguous float32 CPU
tensor in one pass and writes the gradient mask as bits (one scale) or bytes (per channel); its
backward is one pass ``grad * mask``. Here both passes are registered as custom ops
(``qat_lightning::fake_quantize_cpu`` / ``fake_quantize_cpu_backward``) with a fake (meta) kernel and an
autograd formula, so ``torch.compile`` and ``torch.export`` see ops, never pointers: the pointers stay
inside the ops. Values and gradients equal the default path bit for bit (tested).

Selected by :func:`~qat_lightning.quant.backends.set_backend` (``"cpu_kernels"``) or the environment
variable ``QAT_LIGHTNING_BACKEND=cpu_kernels``; without the built extension, or with
``QAT_LIGHTNING_NO_KERNELS=1``, it is unavailable and the default path runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qat_lightning.quant.nodes.functional import load_extension

__all__ = ["kernels_available", "fake_quantize_cpu"]

_KERNELS = load_extension("_kernels")


def kernels_available() -> bool:
    """Whether the fused C fake-quant kernels were built and are not switched off."""
    return _KERNELS is not None


def _layout(x: Tensor, ch_axis: int) -> tuple[int, int, int]:
    """``(outer, channels, inner)`` of ``x`` around ``ch_axis`` (``-1``: one scale)."""
    if ch_axis < 0:
        return x.numel(), 1, 1
    outer = math.prod(x.shape[:ch_axis])
    return outer, x.shape[ch_axis], x.numel() // max(outer * x.shape[ch_axis], 1)


def _mask_like(x: Tensor, ch_axis: int) -> Tensor:
    size = (x.numel() + 7) // 8 if ch_axis < 0 else x.numel()
    return torch.empty(size, dtype=torch.uint8, device=x.device)


@torch.library.custom_op("qat_lightning::fake_quantize_cpu", mutates_args=())
def fake_quantize_cpu(x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int) -> tuple[Tensor, Tensor]:
    """Fake-quantize a contiguous float32 CPU ``x``: ``(result, gradient mask)`` in one pass.

    ``ch_axis = -1``: one scale (bit mask); else per channel along ``ch_axis`` (byte mask).
    """
    out, mask = torch.empty_like(x), _mask_like(x, ch_axis)
    _KERNELS.fake_quantize_forward(
        x.data_ptr(),
        out.data_ptr(),
        mask.data_ptr(),
        scale.data_ptr(),
        *_layout(x, ch_axis),
        float(qmin),
        float(qmax),
        False,
        torch.get_num_threads(),
        False,
    )
    return out, mask


@fake_quantize_cpu.register_fake
def _(x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _mask_like(x, ch_axis)


@torch.library.custom_op("qat_lightning::fake_quantize_cpu_backward", mutates_args=())
def fake_quantize_cpu_backward(grad: Tensor, mask: Tensor, packed: bool) -> Tensor:
    """``grad`` where the forward's mask is set, 0 elsewhere (one pass over a contiguous float32 grad)."""
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    _KERNELS.fake_quantize_backward(
        grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(), packed, torch.get_num_threads()
    )
    return out


@fake_quantize_cpu_backward.register_fake
def _(grad: Tensor, mask: Tensor, packed: bool) -> Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    ctx.packed = inputs[4] < 0
    ctx.save_for_backward(output[1])


def _backward(ctx, grad: Tensor, _grad_mask: Tensor) -> tuple:  # noqa: ANN001
    (mask,) = ctx.saved_tensors
    return (
        torch.ops.qat_lightning.fake_quantize_cpu_backward(grad.float(), mask, ctx.packed),
        None,
        None,
        None,
        None,
    )


fake_quantize_cpu.register_autograd(_backward, setup_context=_setup_context)


def quantize_on_cpu_kernels(
    x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int | None
) -> Tensor | None:
    """Run the backend's fake quant for ``quantize_tensor``; ``None`` where the kernels do not apply."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or scale.device.type != "cpu"
        or scale.dtype != torch.float32
        or not x.is_contiguous()
        or x.numel() == 0
    ):
        return None
    axis = -1 if ch_axis is None or scale.numel() == 1 else ch_axis % x.dim()  # one scale: bit mask
    return torch.ops.qat_lightning.fake_quantize_cpu(x, scale.contiguous().reshape(-1), qmin, qmax, axis)[0]
