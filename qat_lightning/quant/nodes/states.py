"""The states of a quant node: :class:`FakeQuantState` (the seed's name)."""

from __future__ import annotations

import enum

__all__ = ["FakeQuantState"]


class FakeQuantState(str, enum.Enum):
    """What a quant node does on ``forward`` (the seed's ``FakeQuantState``)."""

    QAT = "qat"
    CALIBRATION = "calibration"
    VALIDATION = "validation"
    FLOAT = "float"

    @classmethod
    def parse(cls, value: FakeQuantState | str) -> FakeQuantState:
        """Accept a state or its name (case-insensitive); raise listing the allowed names."""
        if isinstance(value, FakeQuantState):
            return value
        if isinstance(value, str):
            key = value.strip().lower().lstrip("_")
            for state in cls:
                if key in (state.value, state.name.lower()):
                    return state
        raise ValueError(f"unknown FakeQuantState {value!r}; allowed: {', '.join(s.name for s in cls)}")
