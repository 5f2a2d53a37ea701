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
    "check_number",
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


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """Describe the accepted range, e.g. ``a finite number > 0`` or ``a number in [0, 1)``."""
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return "a finite number"


def check_number(
    name: str,
    value: Any,
    who: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Return ``value`` as a float when it is a finite real number in ``[low, high]`` (open ends as asked).

    Args:
        name: the argument's name (in the message).
        value: what the caller passed.
        who: the function it was passed to (message prefix).
        low: the smallest accepted value (``None``: no lower bound).
        high: the largest accepted value (``None``: no upper bound).
        low_open: ``low`` itself is refused (``> low``).
        high_open: ``high`` itself is refused (``< high``).
        allow_none: ``None`` is accepted (the default applies) and returned as is.

    Raises:
        TypeError: for a bool, a string or any other non-number.
        ValueError: for NaN, infinity or a number outside the range.
    """
    if value is None and allow_none:
        return None
    message = f"{_prefix(who)}{name} must be {_interval(low, high, low_open, high_open)}"
    message += f"{' or None' if allow_none else ''}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(message)
    number = float(value)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        raise ValueError(message)
    return number


def require_positive_finite(name: str, value: Any, who: str = "") -> float:
    """Return ``value`` as a float when it is a real number, finite and ``> 0`` (:func:`check_number`)."""
    return check_number(name, value, who, low=0.0, low_open=True)  # type: ignore[return-value]


def require_finite(name: str, value: Any, who: str = "", *, minimum: float = 0.0) -> float:
    """Return ``value`` as a float when it is a finite real number ``>= minimum`` (:func:`check_number`)."""
    return check_number(name, value, who, low=minimum)  # type: ignore[return-value]


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
    """Return ``value`` as a float when it is a real number in the interval (default ``(low, high]``)."""
    return check_number(  # type: ignore[return-value]
        name, value, who, low=low, high=high, low_open=not include_low, high_open=not include_high
    )


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
