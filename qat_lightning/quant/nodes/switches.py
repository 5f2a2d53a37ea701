"""Process-wide switches that the seed's users flip inside a ``forward`` (partial quantization).

``GlobalFakeQuantSwitch.disable()`` makes every fake-quant node that runs afterwards behave as FLOAT
(no observation, identity) until ``enable()``; ``FakeCast.disable()`` (backed by :class:`FakeCastSwitch`)
does the same for float16 nodes. Both default to enabled. They are plain class-level flags: cheap to test
in a hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["GlobalFakeQuantSwitch", "FakeCastSwitch"]


class _ProcessSwitch:
    """A process-wide on/off flag; each subclass owns its own ``_enabled``."""

    _enabled: bool = True

    @classmethod
    def enable(cls) -> None:
        """Turn the switch on for the nodes that run next."""
        cls._enabled = True

    @classmethod
    def disable(cls) -> None:
        """Turn the switch off: the nodes that run next pass values through unchanged."""
        cls._enabled = False

    @classmethod
    def enabled(cls) -> bool:
        """Whether the switch is on."""
        return cls._enabled

    @classmethod
    @contextmanager
    def disabled(cls) -> Iterator[None]:
        """Context manager form of ``disable()``; restores the previous setting on exit."""
        previous = cls._enabled
        cls._enabled = False
        try:
            yield
        finally:
            cls._enabled = previous


class GlobalFakeQuantSwitch(_ProcessSwitch):
    """Global on/off for integer fake quantization (and observation)."""

    _enabled: bool = True


class FakeCastSwitch(_ProcessSwitch):
    """Global on/off for float16 fake cast (exposed to users as ``FakeCast.enable/disable``)."""

    _enabled: bool = True
