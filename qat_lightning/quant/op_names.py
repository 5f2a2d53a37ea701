"""The one op-name matcher: which ops a user's pattern selects.

Op names are stable module paths (``layer1.0.add``; ``head#1`` for the second call site of a shared
``head``), shared by the check report, the per-layer table, the sensitivity table and the templates.
Every place that selects ops by name (``ModuleNameTemplate``, ``set_fp16_norm_scaling``, ``float_ops`` /
``FakeQuantSwitch``, ``QuantMonitor``) uses :func:`match_name`:

* a plain pattern is a prefix on name components: ``"head"`` matches ``head``, ``head.cls`` and
  ``head#1`` (``.`` and ``#`` are component boundaries), not ``header``; ``""`` matches every op;
* a pattern with glob characters (``*?[``) is matched with :func:`fnmatch.fnmatchcase` against the whole
  name, and ``"head.*"`` also matches ``head`` itself (and ``head#1``), like the plain ``"head"``.

Where several patterns match one op and set the same thing (``ModuleNameTemplate``), the longer
pattern wins: :func:`match_order` sorts patterns from the least to the most specific, for applying them
in turn.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

__all__ = ["GLOB_CHARS", "match_name", "match_order"]

#: Characters that make a pattern a glob.
GLOB_CHARS = frozenset("*?[")


def _prefix_match(prefix: str, name: str) -> bool:
    if prefix == "" or name == prefix:
        return True
    return name.startswith(prefix) and name[len(prefix)] in ".#"


def match_name(pattern: str, name: str) -> bool:
    """Whether op ``name`` is selected by ``pattern`` (a prefix on name components, or a glob).

    Args:
        pattern: a plain prefix (``"head"``, ``""`` for all) or a glob (``"head.*"``, ``"*.fc"``).
        name: an op name (``head.cls``, ``head#1``).
    """
    if GLOB_CHARS.isdisjoint(pattern):
        return _prefix_match(pattern, name)
    if fnmatchcase(name, pattern):
        return True
    stem = pattern[:-2]
    return pattern.endswith(".*") and GLOB_CHARS.isdisjoint(stem) and _prefix_match(stem, name)


def match_order(patterns: Iterable[str]) -> list[str]:
    """``patterns`` from the least to the most specific (shorter first; stable for equal lengths)."""
    return sorted(patterns, key=len)
