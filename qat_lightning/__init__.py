"""qat_lightning: the quantization accuracy-tuning workflow as Lightning callbacks and a Hydra app.

``import qat_lightning as ql`` gives the plain-torch core (``ql.fake_quantize``, ``ql.FakeQuantize``,
``ql.get_qconfig``, ...); Lightning callbacks live in ``qat_lightning.callbacks``. The seed's named
setters (``default_calibration_qconfig_setter``, ...) live in :mod:`qat_lightning.compat`; ``ql.<name>``
still finds them (not listed in ``__all__``).
"""

from typing import Any

from qat_lightning.analysis import (
    ExportCheck,
    MixedPrecisionPlan,
    QuantAnalysis,
    check_export,
    search_fp16_topk,
    search_j6p,
    search_mixed_precision,
)
from qat_lightning.quant import *  # noqa: F403
from qat_lightning.quant import __all__ as _quant_all

__version__ = "0.1.0"
__all__ = [
    *_quant_all,
    "ExportCheck",
    "ExportError",  # noqa: F405 - lazy, see __getattr__
    "ExportResult",  # noqa: F405
    "MixedPrecisionPlan",
    "QuantAnalysis",
    "check_export",
    "export_onnx",  # noqa: F405
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "__version__",
]

_EXPORT_NAMES = ("export_onnx", "ExportResult", "ExportError")


def __getattr__(name: str) -> Any:
    """Resolve ``ql.export_onnx`` & co. and the seed's compatibility names (:mod:`qat_lightning.compat`).

    The export names import ``onnx`` on first use (a dependency; importing it is deferred).
    """
    import importlib

    if name in _EXPORT_NAMES:
        return getattr(importlib.import_module("qat_lightning.quant.export"), name)
    compat = importlib.import_module("qat_lightning.compat")
    if name in compat.__all__:
        return getattr(compat, name)
    raise AttributeError(f"module 'qat_lightning' has no attribute {name!r}")
