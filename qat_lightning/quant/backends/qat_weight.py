"""The QAT per-channel weight in one fused kernel: :func:`fused_qat_weight`.

``FakeQuantize._qat_weight_fused`` is this function. Per output channel the kernel folds (BatchNorm), takes
the channel range, computes the scale, fake-quantizes and unfolds while the channel's row is in the L1
cache, writing into a buffer that is reused from step to step once nothing holds the previous result.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qat_lightning.quant.nodes import functional
from qat_lightning.quant.observers import SCALE_EPS

if TYPE_CHECKING:
    from qat_lightning.quant.nodes.fake_quantize import FakeQuantize

__all__ = ["fused_qat_weight"]

_SCALE_EPS_F32 = float(torch.tensor(SCALE_EPS, dtype=torch.float32))


def fused_qat_weight(fq: FakeQuantize, weight: Tensor, fold: Tensor | None) -> Tensor | None:
    """Return QAT ``fq(weight * fold) / fold`` for a per-channel (axis 0) weight node ``fq``, in one kernel.

    For a contiguous float32 CPU weight when the fused kernels are built (``functional``); call
    without autograd. Per output channel the kernel folds, takes the channel range, computes the batch
    scale and fake-quantizes and unfolds, while the channel's row sits in the L1 cache: one pass over
    the weight in memory instead of about six. The same float32 operations as ``update_range`` +
    ``_FakeQuantizeSTE`` (bit-identical values, tested); the statistics and the scale are only updated
    when every channel is finite. Returns ``None`` (nothing changed) when it does not apply or the
    weight holds NaN/inf: the caller then takes the general path.
    """
    obs, scale = fq.observer, fq._buffers["scale"]
    kernels = functional._KERNELS
    if (
        kernels is None
        or fq.ch_axis != 0
        or not fq._dtype.is_integer
        or weight.dim() < 2
        or weight.dtype != torch.float32
        or weight.device.type != "cpu"
        or not weight.is_contiguous()
        or weight.shape[0] != obs.num_channels
    ):
        return None
    if fold is not None:
        if fold.dtype != torch.float32 or fold.numel() != weight.shape[0] or fold.device.type != "cpu":
            return None
        fold = fold.contiguous()
    if fq._dirty:
        fq.refresh_scale()
    channels = weight.shape[0]
    out = _weight_buffer(fq, weight)
    lo, hi, new_scale = (torch.empty(channels) for _ in range(3))
    kernels.fake_quantize_weight(
        weight.data_ptr(),
        0 if fold is None else fold.data_ptr(),
        out.data_ptr(),
        lo.data_ptr(),
        hi.data_ptr(),
        new_scale.data_ptr(),
        channels,
        weight.numel() // channels,
        float(fq._dtype.qmin),
        float(fq._dtype.qmax),
        _SCALE_EPS_F32,
        torch.get_num_threads(),
    )
    if not math.isfinite(float((hi - lo).sum())):
        return None
    torch.minimum(obs.min_val, lo, out=obs.min_val)
    torch.maximum(obs.max_val, hi, out=obs.max_val)
    obs._update_extra(lo, hi)
    obs.num_batches.add_(1)
    scale.copy_(new_scale)
    fq._mark_ready()
    return out


def _weight_buffer(fq: FakeQuantize, weight: Tensor) -> Tensor:
    """Memory for the fused QAT weight: the previous step's buffer once nothing else holds it.

    The previous result is held while a convolution keeps it for its backward (a view of it) or a
    caller keeps it; then, or after a shape change, a new buffer is made (and kept for next time).
    Reusing one buffer per weight saves a weight-sized allocation per step (and the convolution then
    reads weights from the same memory each step; see ``benchmarks/README.md``).
    """
    buf = fq.__dict__.get("_weight_out")
    if (
        buf is None
        or buf.shape != weight.shape
        or buf.device != weight.device
        or sys.getrefcount(buf) != 3  # the cache, `buf` and the call's argument: nobody else
        or buf._use_count() != 1
        or torch._C._storage_Use_Count(buf.untyped_storage()._cdata) != 2  # no view (a saved one)
    ):
        buf = torch.empty_like(weight)
        fq.__dict__["_weight_out"] = buf
    return buf
