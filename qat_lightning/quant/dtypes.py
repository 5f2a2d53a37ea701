"""Quantization data types: ``qint8``, ``qint16`` (integer fake quant), ``float16`` (fake cast), ``float32``.

A :class:`QuantDtype` is a small frozen value. ``parse_dtype`` is the single entry point that turns what
a user writes (``"qint8"``, ``ql.qint16``, ``torch.float16``) into one of the four constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantDtype",
    "qint8",
    "qint16",
    "float16",
    "float32",
    "DTYPES",
    "DtypeLike",
    "parse_dtype",
]


@dataclass(frozen=True)
class QuantDtype:
    """One precision a quant point can run in.

    Attributes:
        name: canonical name (``"qint8"``, ``"qint16"``, ``"float16"``, ``"float32"``).
        qmin: smallest integer code (integer dtypes only, else 0).
        qmax: largest integer code (integer dtypes only, else 0).
        bits: storage width in bits, used by the chip cost model.
        code: stable small integer, stored in module buffers so a dtype survives ``state_dict``.
    """

    name: str
    qmin: int
    qmax: int
    bits: int
    code: int

    @property
    def is_integer(self) -> bool:
        """True for ``qint8``/``qint16`` (fake quantized), False for float dtypes."""
        return self.qmax > 0

    @property
    def is_float16(self) -> bool:
        """True for ``float16`` (fake cast)."""
        return self.name == "float16"

    @property
    def is_float32(self) -> bool:
        """True for ``float32`` (the value passes untouched)."""
        return self.name == "float32"

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


qint8 = QuantDtype("qint8", -128, 127, 8, 0)
qint16 = QuantDtype("qint16", -32768, 32767, 16, 1)
float16 = QuantDtype("float16", 0, 0, 16, 2)
float32 = QuantDtype("float32", 0, 0, 32, 3)

DTYPES: dict[str, QuantDtype] = {d.name: d for d in (qint8, qint16, float16, float32)}
_BY_CODE: dict[int, QuantDtype] = {d.code: d for d in DTYPES.values()}
_ALIASES: dict[str, QuantDtype] = {
    "int8": qint8,
    "int16": qint16,
    "fp16": float16,
    "half": float16,
    "torch.float16": float16,
    "fp32": float32,
    "float": float32,
    "torch.float32": float32,
}

DtypeLike = QuantDtype | str | torch.dtype


def parse_dtype(value: DtypeLike | int) -> QuantDtype:
    """Turn a user-facing dtype into a :class:`QuantDtype`.

    Args:
        value: a ``QuantDtype``, a name (``"qint8"``, ``"qint16"``, ``"float16"``, ``"float32"`` and the
            aliases ``int8``/``int16``/``fp16``/``fp32``), ``torch.float16``/``torch.float32``, or a
            buffer code (int).

    Returns:
        The matching constant.

    Raises:
        ValueError: for anything else; the message lists the accepted names.
    """
    if isinstance(value, QuantDtype):
        return value
    if isinstance(value, torch.dtype):
        if value == torch.float16:
            return float16
        if value == torch.float32:
            return float32
    elif isinstance(value, str):
        key = value.strip().lower()
        found = DTYPES.get(key) or _ALIASES.get(key)
        if found is not None:
            return found
    elif isinstance(value, int) and not isinstance(value, bool) and value in _BY_CODE:
        return _BY_CODE[value]
    raise ValueError(
        f"unknown quantization dtype {value!r}; allowed: {', '.join(DTYPES)} "
        "(or torch.float16 / torch.float32)"
    )
