"""ONNX QDQ export of a prepared model (plain torch + onnx): ``export_onnx`` and its encodings file."""

from qat_lightning.quant.export.encodings import QuantEncoding, encodings_path, read_encodings
from qat_lightning.quant.export.onnx_export import (
    EXPORT_OPSETS,
    ExportError,
    ExportResult,
    export_onnx,
)
from qat_lightning.quant.export.points import QuantPoint, collect_points, export_points

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
