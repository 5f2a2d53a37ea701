"""The built-in example: ``load_digits`` data and a small CNN + attention classifier (see ``model.py``)."""

from qat_lightning.example.data import INK_MAX, PIXEL_MAX, DigitsDataModule, load_digits_tensors
from qat_lightning.example.model import DigitsClassifier, DigitsNet

__all__ = ["INK_MAX", "PIXEL_MAX", "DigitsClassifier", "DigitsDataModule", "DigitsNet", "load_digits_tensors"]
