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
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qat_lightning.callbacks.qat import QAT_SCALES
from qat_lightning.callbacks.sanity import SANITY_MODES
from qat_lightning.chips import CHIPS
from qat_lightning.quant import DTYPES, OBSERVER_NAMES, PREPARE_METHODS, QAT_MODES
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES
from qat_lightning.quant.qconfig.setter import ON_VIOLATION

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
class LrProbeConf:
    """``qat.lr_probe``: the seed's LR probe (QAT §1a), the arguments of ``QatLrProbe(lrs=, steps=)``.

    Attributes:
        lrs: fixed LRs, each fine-tuned ``steps`` steps (no warmup, no decay) before QAT; the best replaces
            ``qat.lr``. Empty: off.
        steps: optimizer steps per probed LR.
    """

    lrs: list[float] = field(default_factory=list)
    steps: int = 20


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
        fix_scales: keep input/output (or all) activation scales at their calibrated values.
        scales: QAT scale mode: ``moving`` (default), ``fixed_input_output``, ``fixed``, ``learned`` (LSQ).
        lr_probe: the seed's LR probe (QAT §1a, :class:`LrProbeConf`); ``lrs: []`` = off.
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
    lr_probe: LrProbeConf = field(default_factory=LrProbeConf)
    scale_trial: bool = False


@dataclass(frozen=True)
class PrepareConf:
    """``prepare()`` options.

    Attributes:
        method: ``auto`` (fx, falling back to eager), ``fx``, ``eager`` or ``jit_strip`` (fx, quantizing
            only what lies between ``QuantStub`` and ``DeQuantStub``).
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
class PtqConf:
    """``ptq=``: post-training algorithms the pipeline tries when all-int8 calibration misses the target.

    Attributes:
        name: the choice.
        equalization: the ``Equalization`` callback (``_target_`` + its arguments), run on the float model
            before prepare, or ``None``.
        after_calibration: callbacks (``_target_`` + arguments: ``AdaRound``, ``BiasCorrection``) run after
            calibration, in this order.
    """

    name: str = "none"
    equalization: dict[str, Any] | None = None
    after_calibration: list[dict[str, Any]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """Whether the choice does anything."""
        return self.equalization is not None or bool(self.after_calibration)


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
