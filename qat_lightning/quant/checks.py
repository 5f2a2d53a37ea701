"""Argument checks shared by the quant and ptq entry points (plain python + torch, no framework imports).

Each check raises where the argument arrives, with a message naming the argument, what it accepts and
what it got: a bool flag is ``True``/``False`` (not ``"no"``), a count is a positive ``int`` (not ``1.5``,
``"2"`` or ``True``), a module argument is an ``nn.Module``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from torch import nn

__all__ = [
    "require_bool",
    "require_count",
    "require_finite",
    "require_module",
    "require_number_in",
    "require_positive_finite",
    "require_str",
]


def _prefix(who: str) -> str:
    return f"{who}: " if who else ""


def require_bool(name: str, value: Any, who: str = "") -> bool:
    """Return ``value`` when it is a bool.

    Raises:
        TypeError: for anything else (a string such as ``"no"`` would otherwise count as ``True``).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{_prefix(who)}{name} must be True or False, got {value!r}")
    return value


def require_count(
    name: str, value: Any, who: str = "", *, minimum: int = 1, allow_none: bool = False
) -> int | None:
    """Return ``value`` as an int when it is an integer ``>= minimum`` (or ``None`` when allowed).

    Raises:
        TypeError: for a bool, a float, a string or any other non-integer.
        ValueError: for an integer below ``minimum``.
    """
    if value is None and allow_none:
        return None
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    none = " or None" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{_prefix(who)}{name} must be {kind}{none}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{_prefix(who)}{name} must be {kind}{none}, got {value!r}")
    return int(value)


def require_positive_finite(name: str, value: Any, who: str = "") -> float:
    """Return ``value`` as a float when it is a real number, finite and ``> 0``.

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for zero, a negative number, NaN or infinity.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{_prefix(who)}{name} must be a finite number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{_prefix(who)}{name} must be a finite number > 0, got {value!r}")
    return float(value)


def require_finite(name: str, value: Any, who: str = "", *, minimum: float = 0.0) -> float:
    """Return ``value`` as a float when it is a real number, finite and ``>= minimum``.

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for NaN, infinity or a number below ``minimum``.
    """
    message = f"{_prefix(who)}{name} must be a finite number >= {minimum:g}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(message)
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(message)
    return float(value)


def require_number_in(
    name: str,
    value: Any,
    who: str = "",
    *,
    low: float,
    high: float,
    include_low: bool = False,
    include_high: bool = True,
) -> float:
    """Return ``value`` as a float when it is a real number in the interval (default ``(low, high]``).

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for a number outside the interval (NaN included).
    """
    interval = f"{'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
    message = f"{_prefix(who)}{name} must be a number in {interval}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(message)
    above = value >= low if include_low else value > low
    below = value <= high if include_high else value < high
    if not (above and below):
        raise ValueError(message)
    return float(value)


def require_str(name: str, value: Any, who: str = "", *, empty: bool = True) -> str:
    """Return ``value`` when it is a str (non-blank unless ``empty``).

    Raises:
        TypeError: for a non-str.
        ValueError: for a blank str when ``empty`` is False.
    """
    kind = "a str" if empty else "a non-empty str"
    if not isinstance(value, str):
        raise TypeError(f"{_prefix(who)}{name} must be {kind}, got {value!r:.60}")
    if not empty and not value.strip():
        raise ValueError(f"{_prefix(who)}{name} must be {kind}, got {value!r}")
    return value


def require_module(value: Any, who: str, name: str = "module") -> nn.Module:
    """Return ``value`` when it is an ``nn.Module``.

    Raises:
        TypeError: naming ``who`` and the type received (e.g. a model's name passed as a string).
    """
    if not isinstance(value, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module for {name}, got {type(value).__name__} {value!r:.60}")
    return value
