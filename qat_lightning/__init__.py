"""qat_lightning: the quantization accuracy-tuning workflow as Lightning callbacks and a Hydra app.

``import qat_lightning as ql`` gives the plain-torch core (``ql.fake_quantize``, ``ql.FakeQuantize``,
``ql.get_qconfig``, ...); Lightning callbacks live in ``qat_lightning.callbacks``. The seed's named
setters (``default_calibration_qconfig_setter``, ...) live in :mod:`qat_lightning.compat`; ``ql.<name>``
still finds them (not listed in ``__all__``).
"""

from typing import Any

from qat_lightning.analysis import (
    MixedPrecisionPlan,
    QuantAnalysis,
    search_fp16_topk,
    search_j6p,
    search_mixed_precision,
)
from qat_lightning.heap import keep_heap
from qat_lightning.quant import *  # noqa: F403
from qat_lightning.quant import __all__ as _quant_all

__version__ = "0.1.0"
__all__ = [
    *_quant_all,
    "MixedPrecisionPlan",
    "QuantAnalysis",
    "keep_heap",
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Resolve the seed's compatibility names (:mod:`qat_lightning.compat`) as ``ql.<name>``."""
    import importlib

    compat = importlib.import_module("qat_lightning.compat")
    if name in compat.__all__:
        return getattr(compat, name)
    raise AttributeError(f"module 'qat_lightning' has no attribute {name!r}")
