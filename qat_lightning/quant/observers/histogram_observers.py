"""Histogram-family calibration observers: ``percentile``, ``kl``, ``mse`` and ``mix``.

Each keeps, besides the running min/max of :class:`~.Observer`, a growing
``|x|`` histogram (:class:`~.histogram.AbsHistogram`, filled by ``forward`` only) and
turns it into a clipping threshold with one of the searches of :mod:`.histogram_search`.
Import them from :mod:`qat_lightning.quant.observers` (which re-exports them and registers them in
``OBSERVERS``) or from here.

Options of all four, after the base ones (``ch_axis``, ``num_channels``, ``ignore_nonfinite``, ``name``):
``bins``, histogram bins per row, a power of two in ``[256, 65536]`` (default
:func:`~.histogram.default_bins`: 2048 per tensor and for ``percentile``; per channel
for ``kl``/``mse``/``mix`` the bins their search uses, ``min(2048, max(256, 2**16 // channels))`` rounded
down to a power of two, e.g. 256 for 256 channels: same scales as 2048 bins, less memory and update
time; the buffer shapes are fixed at construction); ``max_samples``, per-batch sampling cap
(see :mod:`.histogram`), None bins every element. ``percentile`` and ``mix`` also take
``percentile`` in ``(0, 100]``; options are checked in that order (base, ``percentile``, histogram).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qat_lightning.quant.dtypes import QuantDtype
from qat_lightning.quant.observers.base import Observer
from qat_lightning.quant.observers.histogram import DEFAULT_MAX_SAMPLES, AbsHistogram, default_bins
from qat_lightning.quant.observers.histogram_search import (
    MIX_CANDIDATES,
    kl_threshold,
    mix_threshold,
    mse_threshold,
    percentile_threshold,
)

__all__ = ["PercentileObserver", "KLObserver", "MSEObserver", "MixObserver"]


def _add_histogram(obs: Observer, bins: int | None, max_samples: int | None) -> None:
    if bins is None:  # percentile does not merge bins; kl / mse / mix search search_bins(rows) of them
        bins = default_bins(obs._rows, coarsened=obs.kind != "percentile")
    try:
        obs.histogram = AbsHistogram(obs._rows, bins, max_samples)
    except ValueError as err:
        raise ValueError(f"observer {obs.name!r}: {err}") from None


def _hist_args(obs: Observer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hist = obs.histogram
    if hist is None:  # pragma: no cover - set in __init__ of every histogram observer
        raise RuntimeError(f"observer {obs.name!r} has no histogram")
    return hist.counts, hist.width, obs.observed_amax().to(hist.counts.device)


# Every observer subclasses Observer directly (no intermediate classes), so the histogram observers share
# their constructors as plain functions: ``_histogram_init`` (kl, mse) and ``_percentile_init``
# (percentile, mix).


def _histogram_init(
    self: Observer,
    ch_axis: int | None = None,
    num_channels: int | None = None,
    ignore_nonfinite: bool = False,
    name: str = "",
    *,
    bins: int | None = None,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> None:
    """Initialise a histogram observer without a percentile option (``kl``, ``mse``)."""
    Observer.__init__(self, ch_axis, num_channels, ignore_nonfinite, name)
    _add_histogram(self, bins, max_samples)


def _percentile_init(
    self: Observer,
    ch_axis: int | None = None,
    num_channels: int | None = None,
    ignore_nonfinite: bool = False,
    name: str = "",
    *,
    percentile: float = 99.99,
    bins: int | None = None,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> None:
    """Initialise a histogram observer with a ``percentile`` option (``percentile``, ``mix``)."""
    Observer.__init__(self, ch_axis, num_channels, ignore_nonfinite, name)
    p = percentile
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ValueError(
            f"observer {name!r}: percentile must be a number in (0, 100] (e.g. 99.99), got {p!r}"
        )
    self.percentile = float(p)
    _add_histogram(self, bins, max_samples)


class PercentileObserver(Observer):
    """``percentile``: a percentile of ``|x|`` from the histogram, capped at the exact max.

    Args:
        percentile: in ``(0, 100]`` (100 gives the exact ``max |x|``).
        bins, max_samples: histogram options (see the module docstring).
    """

    kind = "percentile"
    __init__ = _percentile_init

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        return percentile_threshold(*_hist_args(self), self.percentile)


class KLObserver(Observer):
    """``kl``: entropy (KL-divergence) calibration on the ``|x|`` histogram.

    See :func:`~.kl_search.kl_threshold` for the exact algorithm: TensorRT's search
    with levels of (at most one bin) equal width, exact zeros left out, and ties (divergence within 5 %
    of the minimum) broken by the smallest estimated quantization error. For int8 it searches thresholds
    with 128 quantized levels; for int16 (32768 levels, finer than any histogram bin) it returns the
    exact ``max |x|``.
    """

    kind = "kl"
    __init__ = _histogram_init

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        return kl_threshold(*_hist_args(self), qdtype.qmax)


class MSEObserver(Observer):
    """``mse``: threshold minimising the histogram-estimated quantization MSE (clipping + rounding).

    See :func:`histogram_error.estimate_mse` for the error model and
    :func:`histogram_search.mse_threshold` for the search (every bin edge, then 16 points at 1/8 of a bin
    around the best); both depend on ``qmax``, so int16 ends near the max and int8 clips more.
    """

    kind = "mse"
    __init__ = _histogram_init

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        return mse_threshold(*_hist_args(self), qdtype.qmax)


class MixObserver(Observer):
    """``mix``: best of several methods, judged on the same statistics.

    For the requested dtype the candidate thresholds are those of ``minmax`` (exact ``max |x|``),
    ``percentile`` (``percentile``, default 99.99), ``mse`` and ``kl``, all from the one histogram; each
    is scored with :func:`histogram_error.estimate_mse` (histogram-estimated quantization MSE, clipping +
    rounding) and the lowest wins, ties going to the earlier name in that order. ``kl`` can never win
    (its thresholds are bin edges or ``max |x|``, all of which ``mse`` or ``minmax`` already score), so
    it is not computed (:func:`histogram_search.mix_threshold`). Per channel each channel picks on its
    own (on at most ``2**16 / channels`` bins per channel: the default per-channel bin count, else the
    histogram merged by :func:`histogram_error.coarsen`).
    ``last_choice`` names the winner of the last ``compute_scale`` (per channel: the one that won the
    most channels) and ``last_choices`` lists the winner per row. Since ``mse`` minimises the same
    estimate, it wins unless ``percentile`` or ``minmax`` lands between its refined points.

    Args:
        percentile: percentile of the ``percentile`` candidate, in ``(0, 100]``.
        bins, max_samples: histogram options (see the module docstring).
    """

    kind = "mix"

    @functools.wraps(_percentile_init)  # same signature (and option checks) as PercentileObserver
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _percentile_init(self, *args, **kwargs)
        self.last_choice: str = ""
        self.last_choices: list[str] = []

    def _threshold(self, qdtype: QuantDtype) -> torch.Tensor:
        thr, win = mix_threshold(*_hist_args(self), qdtype.qmax, self.percentile)
        self.last_choices = [MIX_CANDIDATES[i] for i in win.tolist()]
        self.last_choice = max(MIX_CANDIDATES, key=self.last_choices.count)
        return thr
