"""Typed schema of the ``qat-lightning`` configuration (Hydra structured configs).

The dataclasses below are registered in Hydra's ConfigStore by ``qat_lightning.cli`` (the only module
that imports hydra) as ``qat_lightning_schema``, the first entry of ``conf/config.yaml``'s defaults. Every
group YAML is merged into them, so a misspelt key is an error, and an enum field rejects a misspelt value
listing the valid ones (``Invalid value 'j6x', expected one of [j6e, j6m, j6p]``).

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
import enum
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "AnalysisConf",
    "AppConfig",
    "BnMode",
    "CalibrationConf",
    "ChipConf",
    "ChipName",
    "Dtype",
    "FixScales",
    "QatScales",
    "MetricMode",
    "ObserverName",
    "OnViolation",
    "PipelineConf",
    "PrepareConf",
    "PrepareMethod",
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
    "did_you_mean",
    "schema_node",
    "valid_keys",
    "writable_structured",
]


class ChipName(str, enum.Enum):
    """Target chips (``qat_lightning.chips.CHIPS``)."""

    j6e = "j6e"
    j6m = "j6m"
    j6p = "j6p"


class OnViolation(str, enum.Enum):
    """What to do when a recipe asks for what the chip lacks."""

    error = "error"
    downgrade = "downgrade"


class RecipeName(str, enum.Enum):
    """Precision recipes (``conf/recipe``)."""

    float = "float"
    int8 = "int8"
    int16 = "int16"
    int8_int16 = "int8_int16"
    int16_fp16 = "int16_fp16"
    int8_int16_fp16 = "int8_int16_fp16"
    gemm_int16_other_fp16 = "gemm_int16_other_fp16"
    gemm_int8_other_fp16 = "gemm_int8_other_fp16"


class Dtype(str, enum.Enum):
    """Quantization dtypes."""

    qint8 = "qint8"
    qint16 = "qint16"
    float16 = "float16"
    float32 = "float32"


class SensitiveType(str, enum.Enum):
    """Sensitivity rows a mixed recipe raises (``null`` in YAML = both)."""

    activation = "activation"
    weight = "weight"


class ObserverName(str, enum.Enum):
    """Calibration methods (``qat_lightning.quant.OBSERVER_NAMES`` without ``fixed``)."""

    minmax = "minmax"
    moving_minmax = "moving_minmax"
    percentile = "percentile"
    kl = "kl"
    mse = "mse"
    mix = "mix"


class StageName(str, enum.Enum):
    """What one ``qat-lightning`` run does (``conf/stage``)."""

    float = "float"
    calibration = "calibration"
    qat = "qat"
    analysis = "analysis"
    pipeline = "pipeline"
    troubleshoot = "troubleshoot"


class SanityMode(str, enum.Enum):
    """The seed's checks after QAT (``conf/sanity``)."""

    none = "none"
    lr0 = "lr0"
    float = "float"


class MetricMode(str, enum.Enum):
    """Whether a higher (``max``) or lower (``min``) metric is better."""

    max = "max"
    min = "min"


class QatScheduler(str, enum.Enum):
    """QAT learning-rate schedule: cosine decay or constant, never warmup; ``keep`` = the model's own."""

    cosine = "cosine"
    constant = "constant"
    keep = "keep"


class FixScales(str, enum.Enum):
    """Which activation scales QAT keeps fixed at their calibrated values."""

    none = "none"
    input_output = "input_output"
    all = "all"


class QatScales(str, enum.Enum):
    """How QAT moves activation scales (``QuantizationAwareTraining(scales=...)``).

    ``fix_scales`` is the old name of the fixed modes (none -> moving, input_output -> fixed_input_output,
    all -> fixed).
    """

    moving = "moving"
    fixed_input_output = "fixed_input_output"
    fixed = "fixed"
    learned = "learned"


class BnMode(str, enum.Enum):
    """BatchNorm handling during QAT (``prepare(qat_mode=...)``)."""

    fuse_bn = "fuse_bn"
    with_bn = "with_bn"
    freeze_bn = "freeze_bn"


class PrepareMethod(str, enum.Enum):
    """``prepare(method=...)``."""

    auto = "auto"
    fx = "fx"
    eager = "eager"


@dataclass(frozen=True)
class ChipConf:
    """``chip=``: the target chip and the reaction to a recipe it cannot run.

    Attributes:
        name: chip name.
        on_violation: ``error`` (name the ops and the chip rule) or ``downgrade`` (nearest supported
            dtype; every change listed in the run's ``qconfig_changelog.txt`` and the log).
    """

    name: ChipName = ChipName.j6m
    on_violation: OnViolation = OnViolation.error


@dataclass(frozen=True)
class RecipeConf:
    """``recipe=``: which precision each op gets (turned into a ``QconfigSetter`` by ``app.recipes``).

    Attributes:
        name: recipe name.
        quantize: ``False`` for the float reference (no prepare).
        activation: output dtype of every op (the reference qconfig).
        weight: weight dtype of every gemm (the reference qconfig).
        other: when set, output dtype of every op (``ModuleNameTemplate({"": other})``), e.g. float16.
        gemm_input: conv/linear input dtype (``ConvDtypeTemplate``), ``None`` = as produced.
        gemm_weight: conv/linear weight dtype (``ConvDtypeTemplate``), ``None`` = ``weight``.
        matmul_input: dtypes of the two matmul inputs (``MatmulDtypeTemplate``; one entry = both),
            ``None`` = as produced.
        mixed: raise the most sensitive ops to ``sensitive_dtype`` (``SensitivityTemplate``).
        int16_ratio: share (``< 1``) or count (``>= 1``) of sensitivity rows raised; ``None`` = the minimal
            share meeting the target, by ``search_mixed_precision``.
        sensitive_dtype: dtype the sensitive ops are raised to.
        sensitive_type: raise only ``activation`` or ``weight`` rows; ``None`` = both.
        fp16_topk: number of the ops most sensitive under int16 moved to float16; ``None`` = the fewest
            meeting the target, by search (only recipes with an fp16 step use it).
        fp16_ops: explicit op names moved to float16.
        module_names: extra ``ModuleNameTemplate`` entries, highest priority: op-name prefix -> dtype name
            or a dict (``{threshold: 1024}`` = fixed range, ``{dtype: qint16}``, ...).
        sensitivity_table: a sensitivity table (JSON written by ``stage=analysis``) to use instead of
            computing one.
    """

    name: RecipeName = RecipeName.int8
    quantize: bool = True
    activation: Dtype = Dtype.qint8
    weight: Dtype = Dtype.qint8
    other: Dtype | None = None
    gemm_input: Dtype | None = None
    gemm_weight: Dtype | None = None
    matmul_input: list[Dtype] | None = None
    mixed: bool = False
    int16_ratio: float | None = None
    sensitive_dtype: Dtype = Dtype.qint16
    sensitive_type: SensitiveType | None = SensitiveType.activation
    fp16_topk: int | None = 0
    fp16_ops: list[str] = field(default_factory=list)
    module_names: dict[str, Any] = field(default_factory=dict)
    sensitivity_table: str | None = None


@dataclass(frozen=True)
class CalibrationConf:
    """``calibration=``: the activation observer and how much data it sees.

    Attributes:
        observer: calibration method.
        num_batches: calibration batches (the seed: 10-100; all of a small training set).
        observer_kwargs: extra observer arguments (``percentile``, ``averaging_constant``, ``bins``).
        weight_observer: per-channel weight observer.
    """

    observer: ObserverName = ObserverName.mse
    num_batches: int = 20
    observer_kwargs: dict[str, Any] = field(default_factory=dict)
    weight_observer: ObserverName = ObserverName.minmax


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
        max_epochs: epochs.
        max_steps: steps (``-1`` = by epochs).
        limit_train_batches: ``lightning.Trainer`` argument (``None`` = all).
        limit_val_batches: ``lightning.Trainer`` argument (``None`` = all).
    """

    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None


@dataclass(frozen=True)
class QatConf:
    """Quantization-aware training.

    Attributes:
        max_epochs: epochs (the seed: at most ~20% of the float training steps).
        max_steps: steps (``-1`` = by epochs).
        lr: learning rate of the first parameter group (the others keep their ratio to it); ``None``
            keeps the model's.
        scheduler: ``cosine`` (decay, no warmup), ``constant``, or ``keep`` the model's own (the QAT
            callback then refuses it if it warms up).
        fix_scales: keep input/output (or all) activation scales at their calibrated values (old name).
        scales: QAT scale mode: ``moving`` (default), ``fixed_input_output``, ``fixed``, ``learned`` (LSQ).
        lr_probe: the seed's LR probe (QAT §1a): fixed LRs each fine-tuned ``lr_probe_steps`` steps (no
            warmup, no decay) before QAT; the best replaces ``lr``. Empty: off (``qat.lr`` is used).
        lr_probe_steps: optimizer steps per probed LR.
        scale_trial: the seed's QAT §2: when the calibration model meets the target, QAT runs twice (scales
            updated, input/output scales fixed) and the better is kept (``qat.ckpt``); otherwise QAT runs with
            ``fix_scales`` only.
    """

    max_epochs: int = 3
    max_steps: int = -1
    lr: float | None = 1e-4
    scheduler: QatScheduler = QatScheduler.cosine
    fix_scales: FixScales = FixScales.none
    scales: QatScales = QatScales.moving
    lr_probe: list[float] = field(default_factory=list)
    lr_probe_steps: int = 20
    scale_trial: bool = False


@dataclass(frozen=True)
class PrepareConf:
    """``prepare()`` options.

    Attributes:
        method: ``auto`` (fx, falling back to eager), ``fx`` or ``eager``.
        qat_mode: BatchNorm handling (``fuse_bn`` folds BN into conv, ``with_bn`` keeps it, ``freeze_bn``
            freezes its statistics); structural, so calibration and QAT use the same.
        submodule: attribute of the LightningModule holding the network.
    """

    method: PrepareMethod = PrepareMethod.auto
    qat_mode: BnMode = BnMode.fuse_bn
    submodule: str = "model"


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
    """

    cost_aware: bool = False
    eval_batches: int | None = None


@dataclass(frozen=True)
class PipelineConf:
    """``stage=pipeline`` switches.

    Attributes:
        qat: run QAT on the chosen configuration.
        sanity: run both sanity checks at the end.
        fp16_max: most ops the int16/fp16 step may move to fp16.
    """

    qat: bool = True
    sanity: bool = True
    fp16_max: int = 8


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
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] | None = None
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
