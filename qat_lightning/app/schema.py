"""Typed schema of the ``qat-lightning`` configuration (Hydra structured configs).

The dataclasses below are registered in Hydra's ConfigStore by ``qat_lightning.cli`` (the only module
that imports hydra) as ``qat_lightning_schema``, the first entry of ``conf/config.yaml``'s defaults. Every
group YAML is merged into them, so a misspelt key is an error, and an enum field rejects a misspelt value
listing the valid ones (``Invalid value 'j6x', expected one of [j6e, j6m, j6p]``).
The choice enums live in :mod:`qat_lightning.app.choices`, the quantization sections (chip, recipe,
calibration, prepare, qat, ptq) in :mod:`qat_lightning.app.schema_quant`; both are re-exported here.

The dataclasses are frozen: after composition ``OmegaConf.to_object`` turns the config into an
:class:`AppConfig` the app reads but never changes. Hydra must merge into the schema while composing, so
:func:`schema_node` hands Hydra a writable copy (:func:`omegaconf.OmegaConf.structured` marks frozen
dataclasses read-only).

``model``, ``data``, ``trainer`` and ``logger`` are open dictionaries: they are the arguments of a user's
classes (``_target_``) and of ``lightning.Trainer``; :func:`check_trainer_keys` validates the latter
against ``Trainer``'s signature.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qat_lightning.app.choices import (
    BnMode,
    ChipName,
    Choice,
    Dtype,
    FixScales,
    MetricMode,
    ObserverName,
    OnViolation,
    PrepareMethod,
    QatScales,
    QatScheduler,
    RecipeName,
    SanityMode,
    SensitiveType,
    StageName,
    choices,
)
from qat_lightning.app.schema_quant import (
    CalibrationConf,
    ChipConf,
    LrProbeConf,
    PrepareConf,
    PtqConf,
    QatConf,
    RecipeConf,
)

__all__ = [
    "AnalysisConf",
    "AppConfig",
    "BnMode",
    "CalibrationConf",
    "ChipConf",
    "Choice",
    "ChipName",
    "Dtype",
    "FixScales",
    "LrProbeConf",
    "QatScales",
    "MetricMode",
    "ObserverName",
    "OnViolation",
    "ExportConf",
    "PipelineConf",
    "PrepareConf",
    "PrepareMethod",
    "PtqConf",
    "QatConf",
    "QatScheduler",
    "RecipeConf",
    "RecipeName",
    "SanityConf",
    "SanityMode",
    "SearchConf",
    "SensitiveType",
    "StageConf",
    "StageName",
    "TargetConf",
    "TrainConf",
    "check_trainer_keys",
    "choices",
    "did_you_mean",
    "schema_node",
    "valid_keys",
    "writable_structured",
]


@dataclass(frozen=True)
class StageConf:
    """``stage=``: what this run does.

    Attributes:
        name: stage name.
        needs: the checkpoint kind the stage starts from (``float``/``calibration``), ``None`` = none.
    """

    name: StageName = StageName.pipeline
    needs: str | None = None


@dataclass(frozen=True)
class SanityConf:
    """``sanity=``: the check run after a QAT stage (the pipeline runs both).

    Attributes:
        mode: ``none``, ``lr0`` or ``float``.
        tolerance: allowed absolute metric difference.
        steps: training steps of the lr0 check.
    """

    mode: SanityMode = SanityMode.none
    tolerance: float = 0.005
    steps: int = 4


@dataclass(frozen=True)
class TargetConf:
    """The accuracy target the pipeline and the searches aim at.

    Attributes:
        metric: the logged metric (``trainer.callback_metrics`` key) to judge by.
        mode: ``max`` if higher is better.
        ratio_of_float: target = this share of the float metric (``mode=max``; for ``min``, the float
            metric divided by it).
        value: an absolute target instead of ``ratio_of_float``.
    """

    metric: str = "val/acc"
    mode: MetricMode = MetricMode.max
    ratio_of_float: float = 0.99
    value: float | None = None


@dataclass(frozen=True)
class TrainConf:
    """Float training (``stage=float`` and the pipeline's first step).

    Attributes:
        max_epochs: epochs; not read when ``max_steps > 0``.
        max_steps: optimizer steps; ``> 0`` wins over ``max_epochs`` (``-1`` = by epochs).
        limit_train_batches: ``lightning.Trainer`` argument (``None`` = all).
        limit_val_batches: ``lightning.Trainer`` argument (``None`` = all).
    """

    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None


@dataclass(frozen=True)
class AnalysisConf:
    """Bad cases, layer-by-layer comparison and sensitivity.

    Attributes:
        num_steps: validation batches scanned for bad cases (``None`` = all).
        metrics: bad-case metrics (``COSINE``, ``L1``, ``ATOL``, ``MSE``, ``SQNR``, ``KL``).
    """

    num_steps: int | None = None
    metrics: list[str] = field(default_factory=lambda: ["COSINE", "L1", "ATOL"])


@dataclass(frozen=True)
class SearchConf:
    """``search_mixed_precision`` options.

    Attributes:
        cost_aware: keep high-FLOP ops in low precision first (the seed's "adjust based on cost").
        eval_batches: validation batches per probe (``None`` = all).
        reuse_activations: probes run only the graph downstream of the changed ops, from kept activations
            (``SearchConfig.reuse_activations``; same values, fx-prepared models only).
        cache_budget_mb: most megabytes of kept activations (``SearchConfig.cache_budget_mb``).
    """

    cost_aware: bool = False
    eval_batches: int | None = None
    reuse_activations: bool = False
    cache_budget_mb: float = 1024.0


@dataclass(frozen=True)
class PipelineConf:
    """``stage=pipeline`` switches.

    Attributes:
        qat: run QAT on the chosen configuration.
        sanity: run both sanity checks at the end.
        fp16_max: most ops the int16/fp16 step may move to fp16 (``0``: no fp16 step). The search keeps
            only ops that beat the all-int16 metric (none when all-int16 already meets the target).
    """

    qat: bool = True
    sanity: bool = True
    fp16_max: int = 8


@dataclass(frozen=True)
class ExportConf:
    """ONNX export: ``stage=export`` and the pipeline's last step.

    Attributes:
        enabled: the pipeline exports the chosen model at the end (``stage=export`` always exports).
        check_batches: validation batches for the onnxruntime check (``0``: no check, ``null``: all).
        opset: ``21`` (int16 QDQ) or ``20`` (int8/fp16-only models, runtimes without opset 21).
        dynamic_batch: dim 0 of the inputs and outputs symbolic.
    """

    enabled: bool = True
    check_batches: int | None = 8
    opset: int = 21
    dynamic_batch: bool = True


@dataclass(frozen=True)
class AppConfig:
    """The whole ``qat-lightning`` configuration (``conf/config.yaml``)."""

    chip: ChipConf = field(default_factory=ChipConf)
    recipe: RecipeConf = field(default_factory=RecipeConf)
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    stage: StageConf = field(default_factory=StageConf)
    sanity: SanityConf = field(default_factory=SanityConf)
    target: TargetConf = field(default_factory=TargetConf)
    train: TrainConf = field(default_factory=TrainConf)
    qat: QatConf = field(default_factory=QatConf)
    prepare: PrepareConf = field(default_factory=PrepareConf)
    analysis: AnalysisConf = field(default_factory=AnalysisConf)
    search: SearchConf = field(default_factory=SearchConf)
    pipeline: PipelineConf = field(default_factory=PipelineConf)
    export: ExportConf = field(default_factory=ExportConf)
    ptq: PtqConf = field(default_factory=PtqConf)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] | None = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    ckpt: str | None = None
    seed: int = 0
    progress: bool = True
    torch_threads: int | None = None


def _writable(node: DictConfig) -> DictConfig:
    OmegaConf.set_readonly(node, None)
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)
    return node


def writable_structured(cls: type) -> DictConfig:
    """``OmegaConf.structured(cls)`` without the read-only flag frozen dataclasses get (to merge into)."""
    return _writable(OmegaConf.structured(cls))


def schema_node() -> DictConfig:
    """Return the :class:`AppConfig` schema as a writable structured config, for Hydra's ConfigStore."""
    return writable_structured(AppConfig)


def valid_keys(path: str) -> list[str] | None:
    """Return the schema's keys under a dotted path (``"qat"`` -> its fields), ``None`` if open.

    Args:
        path: dotted path of a node (``""`` = the root).
    """
    cls: Any = AppConfig
    for part in [p for p in path.split(".") if p]:
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return None
        types = {f.name: f for f in fields(cls)}
        if part not in types:
            return None
        default = types[part].default_factory  # type: ignore[misc]
        cls = default() if callable(default) else None
        cls = type(cls) if is_dataclass(cls) else None
    if isinstance(cls, type) and is_dataclass(cls):
        return [f.name for f in fields(cls)]
    return None


def did_you_mean(word: str, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_trainer_keys(trainer: dict[str, Any]) -> None:
    """Refuse ``trainer.*`` keys that ``lightning.Trainer`` does not take, listing the valid ones.

    Raises:
        ValueError: naming the unknown keys and the valid ones.
    """
    import lightning

    params = [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]
    unknown = [k for k in trainer if k not in params]
    if unknown:
        hints = "".join(f"\n  trainer.{k}{did_you_mean(k, params)}" for k in unknown)
        raise ValueError(
            f"unknown lightning.Trainer argument(s):{hints}\nvalid trainer keys: {', '.join(params)}"
        )
