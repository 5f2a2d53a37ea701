"""The observer registry: :data:`OBSERVERS` (method name -> class) and :func:`make_observer`."""

from __future__ import annotations

import inspect
from typing import Any

from qat_lightning.quant.checks import require_bool
from qat_lightning.quant.observers.base import OBSERVER_NAMES, MinMaxObserver, Observer
from qat_lightning.quant.observers.histogram_observers import (
    KLObserver,
    MixObserver,
    MSEObserver,
    PercentileObserver,
)
from qat_lightning.quant.observers.range_observers import FixedScaleObserver, MovingMinMaxObserver

__all__ = ["OBSERVERS", "make_observer"]

OBSERVERS: dict[str, type[Observer]] = {
    cls.kind: cls
    for cls in (
        MinMaxObserver,
        MovingMinMaxObserver,
        PercentileObserver,
        KLObserver,
        MSEObserver,
        MixObserver,
        FixedScaleObserver,
    )
}


def _options(cls: type[Observer]) -> tuple[str, ...]:
    """Return the method options of an observer class: its keyword-only parameters, in order."""
    return tuple(p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY)


def make_observer(
    name: str,
    ch_axis: int | None = None,
    num_channels: int | None = None,
    ignore_nonfinite: bool = False,
    name_for_messages: str = "",
    **kwargs: Any,
) -> Observer:
    """Build an observer by method name.

    Args:
        name: one of :data:`OBSERVER_NAMES`.
        ch_axis: None (per tensor) or the channel axis.
        num_channels: channel count, required with ``ch_axis``.
        ignore_nonfinite: drop NaN/inf instead of raising.
        name_for_messages: owner's name used in errors and warnings (the observer's ``name``).
        **kwargs: method options: ``averaging_constant`` (moving_minmax); ``percentile``, ``bins``,
            ``max_samples`` (percentile, mix); ``bins``, ``max_samples`` (kl, mse); ``threshold`` (fixed,
            required).

    Returns:
        A fresh observer.

    Raises:
        ValueError: unknown method or option (the message lists the allowed ones), or invalid values.
    """
    if name not in OBSERVERS:
        raise ValueError(
            f"unknown observer {name!r} for {name_for_messages!r}; allowed: {', '.join(OBSERVER_NAMES)}"
        )
    allowed = _options(OBSERVERS[name])
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for observer {name!r} ({name_for_messages!r}); "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    if name == "fixed" and "threshold" not in kwargs:
        raise ValueError(f"observer 'fixed' ({name_for_messages!r}) needs threshold=<number > 0>")
    require_bool("ignore_nonfinite", ignore_nonfinite, f"observer {name!r} ({name_for_messages!r})")
    return OBSERVERS[name](ch_axis, num_channels, ignore_nonfinite, name_for_messages, **kwargs)
