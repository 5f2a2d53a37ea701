"""Calibration observers (public face): range observers, histogram observers and the registry.

Statistics are dtype-agnostic, so ``compute_scale(qint8)`` and ``compute_scale(qint16)`` both work from
one calibration pass. Modules: :mod:`.base` (``Observer``, ``minmax``), :mod:`.range_observers`
(``moving_minmax``, ``fixed``), :mod:`.histogram_observers` (``percentile``, ``kl``, ``mse``, ``mix``) on
:mod:`.histogram` and its searches, :mod:`.registry` (``make_observer``).
"""

from qat_lightning.quant.observers.base import (
    DEFAULT_SCALE,
    OBSERVER_NAMES,
    SCALE_EPS,
    MinMaxObserver,
    Observer,
)
from qat_lightning.quant.observers.histogram_observers import (
    KLObserver,
    MixObserver,
    MSEObserver,
    PercentileObserver,
)
from qat_lightning.quant.observers.range_observers import FixedScaleObserver, MovingMinMaxObserver
from qat_lightning.quant.observers.registry import OBSERVERS, make_observer

__all__ = [
    "DEFAULT_SCALE",
    "OBSERVERS",
    "OBSERVER_NAMES",
    "SCALE_EPS",
    "FixedScaleObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MixObserver",
    "MovingMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]
