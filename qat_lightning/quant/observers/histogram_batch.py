"""One batch's contribution to an :class:`~.histogram.AbsHistogram`: sync-free building blocks.

Everything here is made of tensor ops with static shapes (no value is read back to the host), so the
calibration forward of the histogram observers compiles with ``fullgraph`` and never stalls a GPU:
per-row extremes (:func:`row_extremes`, :func:`block_extremes` with the exact tail), the power-of-two
range (:func:`pow2_ceil`) and a fixed-size bincount (:func:`count_bins`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["RANGE_MIN", "TAIL_BLOCK", "block_extremes", "count_bins", "pow2_ceil", "row_extremes"]

RANGE_MIN: float = 2.0**-64
"""Smallest non-zero histogram range (keeps ``bins / range`` finite in float32)."""
TAIL_BLOCK: int = 256

_MANTISSA = (1 << 52) - 1  # float64 bit fields, for pow2_ceil
_EXPONENT = 0x7FF << 52
_RANGE_MIN_BITS = 0x3BF << 52  # RANGE_MIN = 2**-64: biased exponent 1023 - 64


def pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= t`` (at least :data:`RANGE_MIN`) where ``t > 0``, else 0 (float64).

    Exact and sync-free: on the float64 bit pattern of ``t >= 0``, adding the mantissa mask carries into
    the exponent unless the mantissa is zero (a power of two already), then the mantissa is cleared.
    """
    bits = t.double().view(torch.int64)
    p = (bits + _MANTISSA).bitwise_and_(_EXPONENT).clamp_min_(_RANGE_MIN_BITS).mul_(bits > 0)
    return p.view(torch.float64)


def count_bins(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Count the values of ``idx`` (in ``[0, size]``) into ``size`` bins; ``size`` is the dropped dump slot.

    ``index_add_`` keeps the shape static (``bincount``'s depends on the data, and on a GPU it reads the
    maximum back to the host); eager CPU uses ``bincount``, which is faster there and gives the same
    counts (all values are known to be ``<= size``, so its size is ``size + 1`` too).
    """
    flat = idx.reshape(-1)
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.bincount(flat, minlength=size + 1)[:size]
    ones = flat.new_ones(()).expand(flat.numel())
    return torch.zeros(size + 1, dtype=torch.int64, device=flat.device).index_add_(0, flat, ones)[:size]


def row_extremes(x2: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of every row of ``x2`` (shape ``(rows, n)``), leaving out entries where ``valid`` is False.

    Returns:
        ``(min, max)``, shape ``()`` for one row (``torch.aminmax``), else ``(rows,)``; ``+inf`` / ``-inf``
        for a row without a valid entry.
    """
    if valid is not None:
        return torch.where(valid, x2, math.inf).amin(1), torch.where(valid, x2, -math.inf).amax(1)
    if x2.shape[0] > 1:  # amin + amax: several times faster than aminmax(dim=1) on CPU
        return x2.amin(1), x2.amax(1)
    return torch.aminmax(x2)


def block_extremes(
    flat: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min, max and the ``|x|`` maximum of every block of :data:`TAIL_BLOCK` elements (one pass each).

    Args:
        flat: 1-D tensor.
        valid: optional mask shaped like ``flat``; False entries are left out (a block without a
            valid entry has the block maximum ``-inf``).

    Returns:
        ``(min, max, block_abs_max)``; a trailing partial block contributes its elements one by one.
    """
    n_blocks = flat.numel() // TAIL_BLOCK
    body = flat[: n_blocks * TAIL_BLOCK].view(n_blocks, TAIL_BLOCK)
    rest = flat[n_blocks * TAIL_BLOCK :]
    if valid is None:
        bmin, bmax = body.amin(1), body.amax(1)
        rest_lo = rest_hi = rest
    else:
        body_ok = valid[: n_blocks * TAIL_BLOCK].view(n_blocks, TAIL_BLOCK)
        rest_ok = valid[body.numel() :]
        bmin = torch.where(body_ok, body, math.inf).amin(1)
        bmax = torch.where(body_ok, body, -math.inf).amax(1)
        rest_lo, rest_hi = torch.where(rest_ok, rest, math.inf), torch.where(rest_ok, rest, -math.inf)
    lo, hi, tail = bmin.min(), bmax.max(), torch.maximum(-bmin, bmax)
    if rest.numel():
        lo, hi = torch.minimum(lo, rest_lo.min()), torch.maximum(hi, rest_hi.max())
        tail = torch.cat([tail, torch.maximum(-rest_lo, rest_hi)])
    return lo, hi, tail
