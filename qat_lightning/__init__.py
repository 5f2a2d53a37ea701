"""qat_lightning: the quantization accuracy-tuning workflow as Lightning callbacks and Hydra recipes.

``import qat_lightning as ql`` gives the plain-torch core (``ql.fake_quantize``, ``ql.FakeQuantize``,
``ql.get_qconfig``, ...); Lightning callbacks live in ``qat_lightning.callbacks``.
"""

from qat_lightning.analysis import (
    MixedPrecisionPlan,
    QuantAnalysis,
    search_fp16_topk,
    search_j6p,
    search_mixed_precision,
)
from qat_lightning.quant import *  # noqa: F403
from qat_lightning.quant import __all__ as _quant_all

__version__ = "0.1.0"
__all__ = [
    *_quant_all,
    "MixedPrecisionPlan",
    "QuantAnalysis",
    "search_fp16_topk",
    "search_j6p",
    "search_mixed_precision",
    "__version__",
]
