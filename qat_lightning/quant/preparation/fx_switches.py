"""The guide's switches inside a traced ``forward``: recorded as graph nodes that toggle them at run time.

``GlobalFakeQuantSwitch.disable()`` / ``FakeCast.disable()`` (and ``enable()``) called inside ``forward``
flip a process-wide flag while the model runs. torch.fx would run them once at trace time and leave no
trace in the graph, so the prepared model would quantize what the user switched off. While
:func:`recording_switches` is active, those calls instead call ``emit(switch, enabled)`` (the tracer adds a
:func:`set_switch` node there), so the prepared graph toggles the switch at the same point as the eager
model; ``prepare`` reports the ops that run while a switch is off as not quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.fx as fx
from torch.fx import Node

from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

__all__ = ["SWITCH_NAMES", "recording_switches", "set_switch", "switch_nodes"]

_SWITCHES: dict[str, type] = {
    "GlobalFakeQuantSwitch": GlobalFakeQuantSwitch,
    "FakeCastSwitch": FakeCastSwitch,
}
#: The process-wide switches a traced ``forward`` may toggle, by the name :func:`set_switch` takes.
SWITCH_NAMES: tuple[str, ...] = tuple(_SWITCHES)


def set_switch(switch: str, enabled: bool) -> bool:
    """Turn a process-wide switch on or off: the graph node a traced ``Switch.enable()/disable()`` becomes.

    Args:
        switch: ``GlobalFakeQuantSwitch`` or ``FakeCastSwitch``.
        enabled: the new setting.

    Returns:
        The previous setting (what a traced ``with Switch.disabled():`` restores on exit).
    """
    if switch not in _SWITCHES:
        raise ValueError(f"unknown switch {switch!r}; allowed: {', '.join(_SWITCHES)}")
    cls = _SWITCHES[switch]
    previous = cls._enabled
    cls._enabled = bool(enabled)
    return previous


def switch_nodes(graph: fx.Graph) -> list[Node]:
    """Return the :func:`set_switch` nodes of ``graph``, in graph order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is set_switch]


_PATCHED = ("enable", "disable", "disabled")


def _recorded(switch: str, enabled: bool, emit: Callable[[str, Any], Any]) -> classmethod:
    def toggle(cls: type) -> None:
        emit(switch, enabled)

    return classmethod(toggle)


def _recorded_disabled(switch: str, emit: Callable[[str, Any], Any]) -> classmethod:
    @contextmanager
    def disabled(cls: type) -> Iterator[None]:
        previous = emit(switch, False)  # the node's run-time value: the setting before
        try:
            yield
        finally:
            emit(switch, previous)

    return classmethod(disabled)


@contextmanager
def recording_switches(emit: Callable[[str, Any], Any]) -> Iterator[None]:
    """While active, ``enable()`` / ``disable()`` / ``disabled()`` of the switches call ``emit``.

    ``emit(switch, enabled)`` adds a :func:`set_switch` node and returns its proxy; ``disabled()`` emits a
    node turning the switch off on entry and one restoring the previous setting on exit.

    Raises:
        RuntimeError: when already active (a nested trace).
    """
    for name, cls in _SWITCHES.items():
        if any(attr in cls.__dict__ for attr in _PATCHED):
            raise RuntimeError(f"{name} is already being recorded (a nested trace?)")
    try:
        for name, cls in _SWITCHES.items():
            cls.enable = _recorded(name, True, emit)  # type: ignore[attr-defined]
            cls.disable = _recorded(name, False, emit)  # type: ignore[attr-defined]
            cls.disabled = _recorded_disabled(name, emit)  # type: ignore[attr-defined]
        yield
    finally:
        for cls in _SWITCHES.values():
            for attr in _PATCHED:
                if attr in cls.__dict__:
                    delattr(cls, attr)
