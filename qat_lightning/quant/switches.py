"""Process-wide switches that the seed's users flip inside a ``forward`` (partial quantization).

``GlobalFakeQuantSwitch.disable()`` makes every fake-quant node that runs afterwards behave as FLOAT
(no observation, identity) until ``enable()``; ``FakeCast.disable()`` does the same for float16 nodes.
Both default to enabled. They are plain class-level flags: cheap to test in a hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["GlobalFakeQuantSwitch", "FakeCastSwitch"]


class GlobalFakeQuantSwitch:
    """Global on/off for integer fake quantization (and observation)."""

    _enabled: bool = True

    @classmethod
    def enable(cls) -> None:
        """Turn fake quantization back on for the nodes that run next."""
        cls._enabled = True

    @classmethod
    def disable(cls) -> None:
        """Make the nodes that run next pass values through unchanged."""
        cls._enabled = False

    @classmethod
    def enabled(cls) -> bool:
        """Whether integer fake quantization is on."""
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


class FakeCastSwitch:
    """Global on/off for float16 fake cast (exposed to users as ``FakeCast.enable/disable``)."""

    _enabled: bool = True

    @classmethod
    def enable(cls) -> None:
        """Turn float16 fake cast back on."""
        cls._enabled = True

    @classmethod
    def disable(cls) -> None:
        """Let float16 nodes pass values through in float32."""
        cls._enabled = False

    @classmethod
    def enabled(cls) -> bool:
        """Whether float16 fake cast is on."""
        return cls._enabled
