"""Streaming per-layer summaries: what :meth:`QuantAnalysis.run` keeps instead of whole tensors.

:class:`PairStats` accumulates, batch after batch, everything the per-layer table needs from a float
(base) and a quantized (analy) activation of one op, in float64 sums: moments (Chan's parallel update for
mean/var), extremes, the sums behind Cosine/MSE/L1/SQNR, the maxima behind Atol/Rtol, and the per-sample
KL mean. :class:`ClipStats` accumulates the decomposition of a quant node's own error into clipping
(elements beyond ``[qmin - 0.5, qmax + 0.5] * scale``) and rounding (the rest).

Definitions (all over every element seen, in float64):

* ``cosine = sum(a b) / sqrt(sum a^2 sum b^2)`` (1 when both are all zero);
* ``mse = mean (a - b)^2``; ``l1 = mean |a - b|``; ``sqnr = 10 log10(sum a^2 / sum (a - b)^2)``;
* ``atol = max |a - b|``; ``rtol = max |a - b| / |a|`` over the elements with ``a != 0``;
* ``kl`` = mean over samples (dim-0 slices) of ``KL(softmax(a_i) || softmax(b_i))``;
* min/max/mean/var (population variance) over the finite values only; ``nonfinite`` counts NaN/inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Moments", "PairStats", "ClipStats"]


@dataclass
class Moments:
    """Count, mean, M2 (sum of squared deviations), min and max of the finite values seen."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nonfinite: int = 0

    def update(self, x: Tensor) -> None:
        """Merge the values of ``x`` (any shape, any float dtype) into the running moments."""
        flat = x.detach().reshape(-1).to(torch.float64)
        finite = torch.isfinite(flat)
        n_finite = int(finite.sum())
        self.nonfinite += flat.numel() - n_finite
        if n_finite < flat.numel():
            flat = flat[finite]
        if n_finite == 0:
            return
        mean_b = float(flat.mean())
        m2_b = float((flat - mean_b).square().sum())
        n_a, n_b = self.n, n_finite
        total = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * n_a * n_b / total
        self.n = total
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))

    @property
    def var(self) -> float:
        """Population variance (NaN before any finite value)."""
        return self.m2 / self.n if self.n else math.nan


@dataclass
class PairStats:
    """Running comparison of the float and quantized activations of one op (see the module docstring)."""

    base: Moments = field(default_factory=Moments)
    analy: Moments = field(default_factory=Moments)
    count: int = 0
    sum_ab: float = 0.0
    sum_aa: float = 0.0
    sum_bb: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    kl_sum: float = 0.0
    kl_count: int = 0
    shape: tuple[int, ...] = ()

    def update(self, base: Tensor, analy: Tensor) -> None:
        """Add one batch of the op's float and quantized outputs (same shape)."""
        if base.shape != analy.shape:
            raise ValueError(
                f"float and quantized activations differ in shape: {tuple(base.shape)} vs "
                f"{tuple(analy.shape)}"
            )
        self.shape = tuple(base.shape)
        self.base.update(base)
        self.analy.update(analy)
        a = base.detach().reshape(-1).to(torch.float64)
        b = analy.detach().reshape(-1).to(torch.float64)
        diff = (a - b).abs_()
        self.count += a.numel()
        self.sum_ab += float(torch.dot(a, b))
        self.sum_aa += float(torch.dot(a, a))
        self.sum_bb += float(torch.dot(b, b))
        self.sum_abs += float(diff.sum())
        self.sum_sq += float(torch.dot(diff, diff))
        if diff.numel():
            self.max_abs = _nanmax(self.max_abs, float(diff.max()))
            nonzero = a != 0
            if bool(nonzero.any()):
                self.max_rel = _nanmax(self.max_rel, float((diff[nonzero] / a[nonzero].abs()).max()))
        rows_a = a.reshape(base.shape[0], -1) if base.dim() >= 1 and base.shape[0] else a.reshape(1, -1)
        rows_b = b.reshape(rows_a.shape)
        if rows_a.numel():
            logp = torch.log_softmax(rows_a, dim=1)
            logq = torch.log_softmax(rows_b, dim=1)
            self.kl_sum += float((logp.exp() * (logp - logq)).sum())
            self.kl_count += rows_a.shape[0]

    # ------------------------------------------------------------------ final values
    @property
    def cosine(self) -> float:
        """Cosine similarity over every element."""
        if self.sum_aa == 0 and self.sum_bb == 0:
            return 1.0
        if self.sum_aa == 0 or self.sum_bb == 0:
            return 0.0
        return self.sum_ab / math.sqrt(self.sum_aa * self.sum_bb)

    @property
    def mse(self) -> float:
        """Mean squared error."""
        return self.sum_sq / self.count if self.count else math.nan

    @property
    def l1(self) -> float:
        """Mean absolute error."""
        return self.sum_abs / self.count if self.count else math.nan

    @property
    def sqnr(self) -> float:
        """Signal-to-quantization-noise ratio in dB (+inf without noise)."""
        if math.isnan(self.sum_sq) or math.isnan(self.sum_aa):
            return math.nan
        if self.sum_sq == 0:
            return math.inf
        if self.sum_aa == 0:
            return -math.inf
        return 10.0 * math.log10(self.sum_aa / self.sum_sq)

    @property
    def kl(self) -> float:
        """Mean per-sample KL divergence of the softmax distributions."""
        return self.kl_sum / self.kl_count if self.kl_count else math.nan


def _nanmax(current: float, new: float) -> float:
    if math.isnan(new) or math.isnan(current):
        return math.nan
    return max(current, new)


@dataclass
class ClipStats:
    """Squared quant error of one node split into clipping and rounding, over every element seen.

    ``absmax`` is the largest finite ``|x|`` entering the node (the range of the tensor it quantizes).
    """

    clip_error: float = 0.0
    round_error: float = 0.0
    clipped: int = 0
    count: int = 0
    absmax: float = 0.0

    def update(self, x: Tensor, qx: Tensor, scale: Tensor, qmin: int, qmax: int, ch_axis: int | None) -> None:
        """Add one batch: ``x`` entering the node, ``qx`` leaving it, the node's scale and range."""
        xd = x.detach().to(torch.float64)
        err = (qx.detach().to(torch.float64) - xd).square_()
        s = scale.detach().to(torch.float64)
        if ch_axis is not None and s.numel() > 1:
            shape = [1] * xd.dim()
            shape[ch_axis] = -1
            s = s.reshape(shape)
        else:
            s = s.reshape(())
        ratio = xd / s
        clipped = (ratio > qmax + 0.5) | (ratio < qmin - 0.5)
        self.clip_error += float(err[clipped].sum())
        self.round_error += float(err[~clipped].sum())
        self.clipped += int(clipped.sum())
        self.count += xd.numel()
        if xd.numel():
            mags = torch.nan_to_num(xd.abs(), nan=0.0, posinf=0.0)
            self.absmax = max(self.absmax, float(mags.max()))

    @property
    def clip_share(self) -> float:
        """Share of the squared error due to clipping (NaN when there is no error at all)."""
        total = self.clip_error + self.round_error
        return self.clip_error / total if total > 0 else math.nan

    @property
    def clip_ratio(self) -> float:
        """Share of elements clipped."""
        return self.clipped / self.count if self.count else math.nan
