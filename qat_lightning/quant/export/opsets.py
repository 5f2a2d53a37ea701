"""The ONNX opsets the exporter writes (a light module: checking a config value does not import onnx)."""

__all__ = ["EXPORT_OPSETS"]

EXPORT_OPSETS: tuple[int, ...] = (20, 21)
"""Default-domain opsets ``export_onnx`` accepts; int16 QuantizeLinear/DequantizeLinear need 21."""
