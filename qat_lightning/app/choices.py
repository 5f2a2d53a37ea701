"""The choice enums of the config schema, each derived from the core's own list (defined once there).

An enum field rejects a misspelt value listing the valid ones (``Invalid value 'j6x', expected one of
[j6e, j6m, j6p]``). :mod:`qat_lightning.app.schema` uses them and re-exports them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from qat_lightning.callbacks.qat import QAT_SCALES
from qat_lightning.callbacks.sanity import SANITY_MODES
from qat_lightning.chips import CHIPS
from qat_lightning.quant import DTYPES, OBSERVER_NAMES, PREPARE_METHODS, QAT_MODES
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES
from qat_lightning.quant.qconfig.setter import ON_VIOLATION

__all__ = [
    "BnMode",
    "ChipName",
    "Choice",
    "Dtype",
    "FixScales",
    "MetricMode",
    "ObserverName",
    "OnViolation",
    "PrepareMethod",
    "QatScales",
    "QatScheduler",
    "RecipeName",
    "SanityMode",
    "SensitiveType",
    "StageName",
    "choices",
]


class Choice(str, enum.Enum):
    """A config choice value; formats as its value (``${stage.name}`` -> ``qat``, not ``StageName.qat``)."""

    def __str__(self) -> str:
        return str(self.value)


def choices(name: str, values: Iterable[str], doc: str) -> Any:
    """Build a :class:`Choice` enum whose members are ``values`` (the core's own list, defined once there).

    Args:
        name: the enum's name.
        values: the allowed values, in the order error messages list them.
        doc: the enum's docstring.
    """
    members = [(v, v) for v in values]
    cls = Choice(name, members, module=__name__, qualname=name)  # type: ignore[call-overload]
    cls.__doc__ = doc
    return cls


def _recipe_names() -> list[str]:
    from qat_lightning.app.conf_dir import config_dir

    return sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))


ChipName = choices("ChipName", CHIPS, "Target chips (``qat_lightning.chips.CHIPS``).")


OnViolation = choices("OnViolation", ON_VIOLATION, "What to do when a recipe asks for what the chip lacks.")


RecipeName = choices("RecipeName", _recipe_names(), "Precision recipes (the files of ``conf/recipe``).")


Dtype = choices("Dtype", DTYPES, "Quantization dtypes (``qat_lightning.quant.DTYPES``).")


SensitiveType = choices(
    "SensitiveType", SENSITIVE_TYPES, "Sensitivity rows a mixed recipe raises (``null`` in YAML = both)."
)


ObserverName = choices(
    "ObserverName",
    [n for n in OBSERVER_NAMES if n != "fixed"],
    "Calibration methods (``qat_lightning.quant.OBSERVER_NAMES`` without ``fixed``).",
)


StageName = choices(
    "StageName",
    ["float", "calibration", "qat", "analysis", "pipeline", "troubleshoot", "export"],
    "What one ``qat-lightning`` run does (``conf/stage``).",
)


SanityMode = choices("SanityMode", ["none", *SANITY_MODES], "The seed's checks after QAT (``conf/sanity``).")


MetricMode = choices("MetricMode", ["max", "min"], "Higher (``max``) or lower (``min``) is better.")


QatScheduler = choices(
    "QatScheduler",
    ["cosine", "constant", "keep"],
    "QAT learning-rate schedule: cosine decay or constant, never warmup; ``keep`` = the model's own.",
)


FixScales = choices(
    "FixScales", ["none", "input_output", "all"], "Activation scales QAT keeps at their calibrated values."
)


BnMode = choices("BnMode", QAT_MODES, "BatchNorm handling during QAT (``qat_lightning.quant.QAT_MODES``).")


PrepareMethod = choices("PrepareMethod", PREPARE_METHODS, "``prepare(method=)`` (``quant.PREPARE_METHODS``).")


QatScales = choices(
    "QatScales",
    QAT_SCALES,
    "How QAT moves activation scales (``QuantizationAwareTraining(scales=)``; old name ``fix_scales``).",
)
