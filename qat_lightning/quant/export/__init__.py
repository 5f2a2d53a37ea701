"""ONNX QDQ export of a prepared model (plain torch + onnx): ``export_onnx`` and its encodings file.

The names that need ``onnx`` load on first use, so ``EXPORT_OPSETS`` and the quant points cost no onnx import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qat_lightning.quant.export.opsets import EXPORT_OPSETS
from qat_lightning.quant.export.points import QuantPoint, collect_points, export_points

if TYPE_CHECKING:
    from qat_lightning.quant.export.encodings import QuantEncoding, encodings_path, read_encodings
    from qat_lightning.quant.export.onnx_export import ExportError, ExportResult, export_onnx

_LAZY = {
    "ExportError": "onnx_export",
    "ExportResult": "onnx_export",
    "export_onnx": "onnx_export",
    "QuantEncoding": "encodings",
    "encodings_path": "encodings",
    "read_encodings": "encodings",
}

__all__ = [
    "EXPORT_OPSETS",
    "ExportError",
    "ExportResult",
    "QuantEncoding",
    "QuantPoint",
    "collect_points",
    "encodings_path",
    "export_onnx",
    "export_points",
    "read_encodings",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
