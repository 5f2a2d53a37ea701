"""The quant node (public face): :class:`FakeQuantize`, functional fake quant/cast, switches, op modules.

Modules: :mod:`.functional` (``fake_quantize``, ``fake_cast``), :mod:`.switches` (process-wide on/off),
:mod:`.fake_quantize` (the node and its states), :mod:`.qat_modules` (the op modules ``prepare`` builds),
:mod:`.fp16_norm` (fp16 norm simulation), :mod:`.frozen` (``frozen_parameters``: reuse eval-mode BN folds).
"""

from qat_lightning.quant.nodes.fake_cast import FakeCast
from qat_lightning.quant.nodes.fake_quantize import (
    SCALE_MODES,
    FakeQuantize,
    FakeQuantState,
    fake_quant_disabled,
    fake_quant_state,
    iter_fake_quantize,
    set_fake_quantize,
)
from qat_lightning.quant.nodes.frozen import frozen_parameters
from qat_lightning.quant.nodes.functional import (
    FP16_MAX,
    fake_cast,
    fake_quantize,
    lsq_quantize,
    quantize_tensor,
)
from qat_lightning.quant.nodes.qat_scales import set_qat_scales
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

__all__ = [
    "SCALE_MODES",
    "lsq_quantize",
    "quantize_tensor",
    "set_qat_scales",
    "FP16_MAX",
    "FakeCast",
    "FakeCastSwitch",
    "FakeQuantState",
    "FakeQuantize",
    "GlobalFakeQuantSwitch",
    "fake_cast",
    "fake_quant_disabled",
    "fake_quant_state",
    "fake_quantize",
    "frozen_parameters",
    "iter_fake_quantize",
    "set_fake_quantize",
]
