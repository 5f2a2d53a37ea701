"""Argument checks of the callbacks' constructors: each raises where the argument arrives.

Like Lightning's ``EarlyStopping``, a callback checks its arguments in ``__init__``, so a typo in a config
fails when the trainer is built, not at the end of a long fit. Every message names the callback, the
argument, what it accepts and what it got. The plain checks (bool flags, strings, numbers) are those of
:mod:`qat_lightning.quant.checks`; this module adds what only the callbacks take: counts that keep their
historical wording, dataloader names, name patterns, choice lists and callables.

Decisions:

* a count is an integer of any integer type (``numpy.int64`` too), stored as ``int``; a bool, a float
  (even ``2.0``: ``calibrate`` and the ptq core refuse it too) or a string is refused with a ``TypeError``;
* a plain string given where a list is expected (patterns, stages, kinds, metrics) is *one* entry, not one
  entry per character; an empty list is refused (``None`` says "all" where the argument allows it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import torch

from qat_lightning.callbacks._common import DATALOADER_CHOICES
from qat_lightning.quant.checks import require_bool, require_str

__all__ = [
    "check_callable",
    "check_choices",
    "check_count",
    "check_dataloader",
    "check_number",
    "check_number_list",
    "check_patterns",
    "check_submodule",
    "name_sample",
    "require_bool",
    "unmatched_patterns",
]


def check_count(name: str, value: Any, who: str, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """Return ``value`` as an ``int`` when it is an integer ``>= minimum`` (or ``None`` when allowed).

    Args:
        name: the argument's name.
        value: what the caller passed.
        who: the callback, for the message.
        minimum: the smallest value accepted.
        allow_none: accept ``None`` (returned as is).

    Raises:
        TypeError: for a bool, a float (``1.5`` and ``2.0`` alike), a string or any other non-integer.
        ValueError: for an integer below ``minimum``.
    """
    if value is None and allow_none:
        return None
    message = (
        f"{who}: {name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r:.60}"
    )
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(message)
    if value < minimum:
        raise ValueError(message)
    return int(value)


def check_submodule(value: Any, who: str) -> str:
    """Return the attribute path of the network (``""`` is the LightningModule itself).

    Raises:
        TypeError: for a non-str.
    """
    return require_str("submodule", value, who)


def check_callable(name: str, value: Any, who: str) -> Callable[..., Any] | None:
    """Return ``value`` when it is ``None`` or callable.

    Raises:
        TypeError: for anything else (e.g. a function's name given as a string).
    """
    if value is not None and not callable(value):
        raise TypeError(f"{who}: {name} must be a callable or None, got {value!r:.60}")
    return value


def check_dataloader(value: Any, who: str) -> Any:
    """Return ``value`` when it is a split name (``"train"``, ``"val"``, ``"test"``) or an iterable.

    Raises:
        ValueError: for another split name.
        TypeError: for something that is neither a str nor iterable.
    """
    names = ", ".join(repr(n) for n in DATALOADER_CHOICES)
    if isinstance(value, str):
        if value not in DATALOADER_CHOICES:
            raise ValueError(
                f"{who}: dataloader={value!r} is not supported; allowed: {names}, or an iterable"
            )
        return value
    if not isinstance(value, Iterable):
        raise TypeError(f"{who}: dataloader must be {names} or an iterable of batches, got {value!r:.60}")
    return value


def _entries(name: str, value: Any, who: str, what: str) -> list[Any]:
    """Return a str as one entry, any other iterable as its entries (at least one); else a ``TypeError``."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or isinstance(value, bytes):
        raise TypeError(f"{who}: {name} must be {what}, got {value!r:.60}")
    entries = list(value)
    if not entries:
        raise ValueError(f"{who}: {name} must be {what}, got {value!r:.60}")
    return entries


def check_patterns(name: str, value: Any, who: str, *, allow_none: bool = True) -> list[str] | None:
    """Return name patterns as a list: a str as one pattern, a sequence of str as it is (``None`` as is).

    Raises:
        TypeError: for a non-iterable or an entry that is not a str (``None`` unless ``allow_none``).
        ValueError: for an empty sequence (``None`` means "all" where it is allowed).
    """
    if value is None and allow_none:
        return None
    what = "a name pattern (str) or a non-empty list of them" + (", or None (all)" if allow_none else "")
    patterns = _entries(name, value, who, what)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{who}: {name} must be {what}, got {value!r:.60}")
    return patterns


def check_choices(name: str, value: Any, allowed: Sequence[str], who: str) -> tuple[str, ...]:
    """Return the chosen options as a tuple: a str is one option, a sequence its options (at least one).

    Raises:
        ValueError: for an empty sequence or an option not in ``allowed`` (the message lists them).
        TypeError: for a non-iterable.
    """
    what = f"at least one of: {', '.join(allowed)}"
    try:
        chosen = _entries(name, value, who, f"a str or a list naming {what}")
    except ValueError:
        raise ValueError(f"{who}: {name} must name {what}; got {value!r:.60}") from None
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise ValueError(f"{who}: unknown {name} {unknown}; allowed: {', '.join(allowed)}")
    return tuple(chosen)


def check_number(name: str, value: Any, who: str) -> float | None:
    """Return ``value`` as a float when it is ``None`` or a finite real number.

    A one-element tensor (a metric read from ``trainer.callback_metrics``) counts as its value.

    Raises:
        TypeError: for a bool, a string or another non-number.
        ValueError: for NaN or infinity.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    message = f"{who}: {name} must be a finite number or None, got {value!r:.60}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(message)
    if not math.isfinite(value):
        raise ValueError(message)
    return float(value)


def check_number_list(
    name: str,
    value: Any,
    who: str,
    *,
    what: str,
    low: float,
    high: float = math.inf,
    include_low: bool = False,
) -> tuple[float, ...]:
    """Return one or more finite real numbers in ``(low, high]`` (``[low, high]`` with ``include_low``).

    Args:
        name: the argument's name.
        value: what the caller passed (a sequence of numbers).
        who: the callback, for the message.
        what: how the message describes the accepted values.
        low: the lower bound.
        high: the upper bound (included).
        include_low: whether ``low`` itself is accepted.

    Raises:
        TypeError: for a non-sequence (a single number too) or an entry that is not a real number.
        ValueError: for no entry, or an entry out of range, NaN or infinite.
    """
    message = f"{who}: {name} must be {what}, got {value!r:.80}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(message)
    numbers = list(value)
    if not numbers:
        raise ValueError(message)
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in numbers):
        raise TypeError(message)
    above = (lambda v: v >= low) if include_low else (lambda v: v > low)
    if not all(math.isfinite(v) and above(v) and v <= high for v in numbers):
        raise ValueError(message)
    return tuple(float(v) for v in numbers)


def unmatched_patterns(
    patterns: Sequence[str], names: Iterable[str], match: Callable[[str, str], bool]
) -> list[str]:
    """Return the patterns that select none of ``names`` (in the patterns' order)."""
    names = list(names)
    return [p for p in patterns if not any(match(p, n) for n in names)]


def name_sample(names: Sequence[str], limit: int = 8) -> str:
    """Return a few of ``names`` for a message: ``a, b, c, ... (12 in all)``, or ``(none)``."""
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
