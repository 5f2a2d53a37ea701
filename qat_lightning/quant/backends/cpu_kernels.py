"""The opt-in CPU backend ``cpu_kernels``: fused C fake-quant kernels, also as ``torch.library`` custom ops.

``_kernels.c`` (built by ``setup.py`` when a C compiler is there) fake-quantizes a contiguous float32 CPU
tensor in one pass and writes the gradient mask as bits (one scale) or bytes (per channel); its
backward is one pass ``grad * mask``. Both passes are registered as custom ops
(``qat_lightning::fake_quantize_cpu`` / ``fake_quantize_cpu_backward``, ``fake_quantize_cpu_with_extremes``)
with a fake (meta) kernel and an autograd formula, so that traced code (``torch.compile``, ``torch.export``)
that calls them sees ops, never pointers: the pointers stay inside the ops. The quant nodes use the backend
in eager mode only (traced, they run the ATen formula, which inductor fuses), and there they call the same
passes through a plain ``autograd.Function`` (:class:`_EagerFakeQuantize`): a registered op's dispatch
(dispatcher, Python autograd wrapper, redispatch, forward and backward) measured 0.04-0.05 of a QAT step.
Values and gradients equal the default path bit for bit, and the ops equal the eager path (tested).

QAT weights whose per-channel scale follows the weights (optionally BN-folded) go through the weight kernel
(``qat_lightning::fake_quantize_weight_cpu``; in eager mode called directly): per output channel the range,
the scale and the fake-quantized row in one read of the weight (the row stays in cache between the range
and the quantize), where the default path reads the weight six times (``amin``, ``amax``, multiply, round,
clamp, multiply). A per-tensor QAT node with a scale takes its batch range from the fake quant's own loop.

In eager mode the QAT bookkeeping that follows (the observer's running min / max, moving averages and
counters, the scale's moving average, ``scale_ready``) runs in C on the host, on the node's CPU buffers:
one call where the ATen ops made about 17 dispatcher calls on 0-d tensors per node. It covers the
observers whose range rules it implements (``minmax``, the histogram observers, ``moving_minmax``; not
``ignore_nonfinite``) and buffers of the dtypes it writes; others run the default bookkeeping. The buffers'
versions are moved (``torch.autograd.graph.increment_version``), so autograd still sees the writes. Values,
scales and observer statistics equal the default path's bit for bit (tested, ``lerp``'s rounding included).

Selected by :func:`~qat_lightning.quant.backends.set_backend` (``"cpu_kernels"``) or the environment variable
``QAT_LIGHTNING_BACKEND=cpu_kernels``; without the built extension, or with ``QAT_LIGHTNING_NO_KERNELS=1``,
it is unavailable and the default path runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from qat_lightning.quant.backends.sparse_grad import sparse_masked
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState
from qat_lightning.quant.nodes.functional import load_extension
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch
from qat_lightning.quant.observers import SCALE_EPS, Observer
from qat_lightning.quant.observers.range_observers import MovingMinMaxObserver

__all__ = [
    "kernels_available", "fake_quantize_cpu", "fake_quantize_cpu_with_extremes", "fake_quantize_weight_cpu"
]  # fmt: skip

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


def _forward_pass(
    x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int, with_range: bool
) -> tuple[Tensor, Tensor, tuple[float, float] | None]:
    """Run the C forward on a contiguous float32 CPU ``x``: ``(result, mask, (min, max) or None)``."""
    out, mask = torch.empty_like(x), _mask_like(x, ch_axis)
    returned = _KERNELS.fake_quantize_forward(
        x.data_ptr(),
        out.data_ptr(),
        mask.data_ptr(),
        scale.data_ptr(),
        *_layout(x, ch_axis),
        float(qmin),
        float(qmax),
        torch.get_num_threads(),
        with_range,
    )
    return out, mask, returned[1:] if with_range else None


def _backward_pass(grad: Tensor, mask: Tensor, packed: bool) -> Tensor:
    """Run the C backward: ``grad`` where ``mask`` is set, 0 elsewhere (a sparse ``grad`` stays sparse)."""
    if grad.is_sparse:
        return sparse_masked(grad, mask, packed)
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    _KERNELS.fake_quantize_backward(
        grad.data_ptr(), mask.data_ptr(), out.data_ptr(), grad.numel(), packed, torch.get_num_threads()
    )
    return out


@torch.library.custom_op("qat_lightning::fake_quantize_cpu", mutates_args=())
def fake_quantize_cpu(x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int) -> tuple[Tensor, Tensor]:
    """Fake-quantize a contiguous float32 CPU ``x``: ``(result, gradient mask)`` in one pass.

    ``ch_axis = -1``: one scale (bit mask); else per channel along ``ch_axis`` (byte mask).
    """
    return _forward_pass(x, scale, qmin, qmax, ch_axis, False)[:2]


@fake_quantize_cpu.register_fake
def _(x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), _mask_like(x, ch_axis)


@torch.library.custom_op("qat_lightning::fake_quantize_cpu_backward", mutates_args=())
def fake_quantize_cpu_backward(grad: Tensor, mask: Tensor, packed: bool) -> Tensor:
    """``grad`` where the forward's mask is set, 0 elsewhere (one pass over a contiguous float32 grad)."""
    return _backward_pass(grad, mask, packed)


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


@torch.library.custom_op("qat_lightning::fake_quantize_cpu_with_extremes", mutates_args=())
def fake_quantize_cpu_with_extremes(
    x: Tensor, scale: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One-scale :func:`fake_quantize_cpu` that also returns ``[min, max]`` of ``x`` from the same read.

    The range is taken block by block beside the fake quant, so ``x`` is read from memory once (the
    observer's ``torch.aminmax`` reads it again). A NaN or inf anywhere gives ``[nan, nan]``.
    """
    out, mask, extremes = _forward_pass(x, scale, qmin, qmax, -1, True)
    return out, mask, torch.tensor(extremes, dtype=torch.float32)


@fake_quantize_cpu_with_extremes.register_fake
def _(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), _mask_like(x, -1), x.new_empty(2, dtype=torch.float32)


def _setup_context_with_extremes(ctx, inputs: tuple, output: tuple) -> None:  # noqa: ANN001
    ctx.packed = True
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1])


def _backward_with_extremes(ctx, grad: Tensor, _grad_mask: Tensor, _grad_extremes: Tensor) -> tuple:  # noqa: ANN001
    return _backward(ctx, grad, _grad_mask)[:4]


fake_quantize_cpu_with_extremes.register_autograd(
    _backward_with_extremes, setup_context=_setup_context_with_extremes
)


class _EagerFakeQuantize(torch.autograd.Function):
    """What the registered ops compute, for eager mode, without ``torch.library``'s dispatch.

    The same ``_forward_pass`` / ``_backward_pass`` as the ops. A registered custom op goes through the
    dispatcher, a Python autograd wrapper and a redispatch on each call, forward and backward: in a QAT step
    that measured 0.04-0.05 of the float step (benchmarks/README.md, "QAT step", stop 24). Traced code
    never gets here (see :func:`_takes`).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int, extremes: list | None
    ) -> Tensor:
        out, mask, found = _forward_pass(x, scale, qmin, qmax, ch_axis, extremes is not None)
        ctx.packed = ch_axis < 0
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(mask)
        if extremes is not None:
            extremes[:] = found  # (min, max) of x as floats: ``extremes`` is the caller's list
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple:  # noqa: D102
        (mask,) = ctx.saved_tensors
        return _backward_pass(grad.float(), mask, ctx.packed), None, None, None, None, None


def _takes(x: Tensor) -> bool:
    """Whether the kernels take ``x``: a non-empty contiguous float32 CPU tensor, in eager mode."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and x.numel() > 0
        and not torch.compiler.is_compiling()
    )


def quantize_on_cpu_kernels(
    x: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int | None
) -> Tensor | None:
    """Run the backend's fake quant for ``quantize_tensor``; ``None`` where the kernels do not apply."""
    if not _takes(x) or scale.device.type != "cpu" or scale.dtype != torch.float32:
        return None
    axis = -1 if ch_axis is None or scale.numel() == 1 else ch_axis % x.dim()  # one scale: bit mask
    return _EagerFakeQuantize.apply(x, scale.contiguous().reshape(-1), qmin, qmax, axis, None)


# ------------------------------------------------------------------------------------------ QAT weights
@torch.library.custom_op("qat_lightning::fake_quantize_weight_cpu", mutates_args=())
def fake_quantize_weight_cpu(
    weight: Tensor, fold: Tensor | None, scale: Tensor, qmin: int, qmax: int, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run a per-channel QAT weight step on a contiguous float32 CPU ``weight`` (axis 0: output channel).

    With ``t = weight * fold`` per row (``fold`` ``None``: ``t = weight``): ``(value, lo, hi, new scale)``,
    ``lo`` / ``hi`` the range of ``t`` per row (NaN for a row holding NaN/inf), the new scale
    ``max(-lo, hi) / qmax`` at least ``eps`` (``scale``, the old one, on NaN rows) and
    ``value = clamp(round(weight * (fold / s)), qmin, qmax) * (s / fold)``.
    """
    lo, hi, new = (torch.empty(weight.shape[0], dtype=torch.float32) for _ in range(3))
    out = _weight_pass(weight, fold, scale, qmin, qmax, eps, (lo.data_ptr(), hi.data_ptr(), new.data_ptr()))
    return out, lo, hi, new


def _weight_pass(
    weight: Tensor,
    fold: Tensor | None,
    scale: Tensor,
    qmin: int,
    qmax: int,
    eps: float,
    written: tuple[int, int, int],
) -> Tensor:
    """Run the C weight step of :func:`fake_quantize_weight_cpu` (also called directly in eager mode).

    Returns the fake-quantized weight; writes the rows' minima, maxima and new scales to the three float32
    arrays at the addresses ``written`` (the new scales may go to ``scale`` itself: a row reads its old scale
    before writing its new one).
    """
    channels = weight.shape[0]
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    _KERNELS.fake_quantize_weight(
        weight.data_ptr(),
        0 if fold is None else fold.data_ptr(),
        out.data_ptr(),
        written[0],
        written[1],
        scale.data_ptr(),
        written[2],
        channels,
        weight.numel() // channels,
        float(qmin),
        float(qmax),
        eps,
        torch.get_num_threads(),
    )
    return out


@fake_quantize_weight_cpu.register_fake
def _(
    weight: Tensor, fold: Tensor | None, scale: Tensor, qmin: int, qmax: int, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    channels = weight.shape[0]
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return out, *(weight.new_empty(channels, dtype=torch.float32) for _ in range(3))


def quantize_weight_on_cpu_kernels(wq: FakeQuantize, weight: Tensor, fold: Tensor | None) -> Tensor | None:
    """Run the QAT weight step of ``quantize_weight`` (no autograd); ``None`` where the kernel does not apply.

    It applies to a per-output-channel integer node in QAT whose scale follows the weights (``moving``)
    and whose observer does not drop NaN/inf, on a contiguous float32 CPU weight.
    """
    scale = wq._buffers["scale"]
    if not (
        wq.state is FakeQuantState.QAT
        and wq.scale_mode == "moving"
        and wq.ch_axis == 0
        and wq.dtype.is_integer
        and not wq.observer.ignore_nonfinite
        and GlobalFakeQuantSwitch._enabled
        and _takes(weight)
        and weight.dim() >= 1
        and scale.device.type == "cpu"
        and scale.numel() == weight.shape[0]
        and (
            fold is None
            or (fold.dtype == torch.float32 and fold.device.type == "cpu" and fold.numel() == weight.shape[0])
        )
    ):
        return None
    bookkeeping = _bookkeeping(wq)
    if bookkeeping is None:
        return None
    f = None if fold is None else fold.detach().reshape(-1).contiguous()
    channels = scale.numel()
    extremes = torch.empty(2 * channels, dtype=torch.float32)  # the rows' minima, then their maxima
    lo, hi = extremes.data_ptr(), extremes.data_ptr() + 4 * channels
    value = _weight_pass(
        weight.detach(), f, scale, wq.dtype.qmin, wq.dtype.qmax, SCALE_EPS, (lo, hi, scale.data_ptr())
    )  # the new scales straight into the buffer
    args, written = bookkeeping
    _KERNELS.record_rows(lo, hi, channels, *args, written[-2].data_ptr())
    for tensor in written:  # written through their addresses: autograd's checks must see it
        increment_version(tensor)  # one tensor per call: the form every supported torch accepts
    return value


_HOST_RULES: dict[type, str] = {}


def _host_rules(observer: Observer) -> str:
    """Which range rules of ``observer`` the C bookkeeping follows: ``"minmax"``, ``"moving"`` or ``""``.

    ``"minmax"``: ``Observer``'s own (running min / max and the two counters: ``_record_range`` and
    ``record_extremes``, nothing in ``_update_extra``); ``"moving"``: those plus ``MovingMinMaxObserver``'s
    averages; ``""`` (not followed) for other rules or dropped NaN/inf.
    """
    kind = type(observer)
    if kind not in _HOST_RULES:
        base = all(getattr(kind, n) is getattr(Observer, n) for n in ("_record_range", "record_extremes"))
        extra = {Observer._update_extra: "minmax", MovingMinMaxObserver._update_extra: "moving"}
        _HOST_RULES[kind] = extra.get(kind._update_extra, "") if base else ""
    return "" if observer.ignore_nonfinite else _HOST_RULES[kind]


def _bookkeeping(node: FakeQuantize) -> tuple[list[Any], list[Tensor]] | None:
    """Return the C bookkeeping's observer arguments and the buffers it writes (``None``: it does not apply).

    Arguments: the addresses of ``min_val``, ``max_val``, ``avg_min``, ``avg_max`` (0, 0 unless the observer
    averages), its averaging constant, the addresses of ``num_batches`` and ``nonfinite_batches``. Written:
    those buffers, ``scale_ready`` and ``scale``, each checked to be a contiguous CPU tensor of the dtype the
    C code writes (an address is all it gets).
    """
    observer = node.observer
    rules = _host_rules(observer)
    if not rules:
        return None
    ranges = [observer.min_val, observer.max_val]
    averages = [observer.avg_min, observer.avg_max] if rules == "moving" else []
    counters = [observer.num_batches, observer.nonfinite_batches]
    node_buffers = [node._buffers["scale_ready"], node._buffers["scale"]]
    written = [*ranges, *averages, *counters, *node_buffers]
    dtypes = [torch.float32] * (len(ranges) + len(averages)) + [torch.int64] * 2 + [torch.bool, torch.float32]
    for tensor, dtype in zip(written, dtypes, strict=True):
        if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
    constant = getattr(observer, "averaging_constant", 0.0)
    addresses = [t.data_ptr() for t in written]
    n = len(ranges) + len(averages)
    return [*addresses[:2], *(addresses[2:n] or [0, 0]), constant, *addresses[n : n + 2]], written


def quantize_and_observe_on_cpu_kernels(node: FakeQuantize, x: Tensor) -> Tensor | None:
    """Run the QAT step of a per-tensor node with a moving scale, reading ``x`` once.

    As ``FakeQuantize._qat_forward`` once the node has a scale: ``x`` is fake-quantized with the scale
    as it stands, the observer records the batch range as ``Observer.record_extremes`` does, and the scale
    moves toward the batch's (``lerp`` by ``qat_averaging_constant``). The range comes from the same read
    as the fake quant; the bookkeeping on the node's 0-d buffers runs in C on the host (one call where the
    tensor ops made about 17 dispatcher calls), bit for bit what the tensor ops give (tested). ``None``
    where the kernels do not apply (the caller then runs the default path).
    """
    bookkeeping = _bookkeeping(node) if _takes(x) else None
    if bookkeeping is None:
        return None
    args, written = bookkeeping
    dtype, ready, scale = node.dtype, written[-2], written[-1]
    extremes: list[float] = []
    out = _EagerFakeQuantize.apply(x, scale, dtype.qmin, dtype.qmax, -1, extremes)
    _KERNELS.record_moving_step(
        *extremes, *args, ready.data_ptr(), scale.data_ptr(), node.qat_averaging_constant, float(dtype.qmax),
        SCALE_EPS,
    )  # fmt: skip
    for tensor in written:  # written through their addresses: autograd's checks must see it
        increment_version(tensor)  # one tensor per call: the form every supported torch accepts
    return out
