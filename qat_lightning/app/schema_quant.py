"""The quantization sections of the config schema: chip, recipe, calibration, prepare, QAT and PTQ.

The run sections (stage, target, training, analysis, search, pipeline, export) and the root
:class:`~qat_lightning.app.schema.AppConfig` are in :mod:`qat_lightning.app.schema`, which re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qat_lightning.app.choices import (
    BnMode,
    ChipName,
    Dtype,
    FixScales,
    ObserverName,
    OnViolation,
    PrepareMethod,
    QatScales,
    QatScheduler,
    RecipeName,
    SensitiveType,
)

__all__ = ["CalibrationConf", "ChipConf", "LrProbeConf", "PrepareConf", "PtqConf", "QatConf", "RecipeConf"]


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
        max_epochs: epochs (the seed: at most ~20% of the float training steps); not read when
            ``max_steps > 0``.
        max_steps: optimizer steps; ``> 0`` wins over ``max_epochs`` (``-1`` = by epochs).
        lr: learning rate of the first parameter group (the others keep their ratio to it); ``None``
            keeps the model's.
        scheduler: ``cosine`` (decay, no warmup), ``constant``, or ``keep`` the model's own (the QAT
            callback then refuses it if it warms up).
        fix_scales: the old name of ``scales`` (``input_output`` = ``fixed_input_output``, ``all`` =
            ``fixed``); a value contradicting ``scales`` is refused.
        scales: QAT scale mode: ``moving`` (default), ``fixed_input_output``, ``fixed``, ``learned`` (LSQ).
        lr_probe: the seed's LR probe (QAT §1a, :class:`LrProbeConf`); ``lrs: []`` = off.
        scale_trial: the seed's QAT §2: when the calibration model meets the target, QAT runs twice
            (``scales=moving``, ``scales=fixed_input_output``) and the better is kept (``qat.ckpt``);
            otherwise QAT runs once with ``scales``, which must then be one of those two.
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
        int_bias: in VALIDATION (and the export) conv / linear with integer input and weight add the bias
            as deployed, int32 at scale ``s_in * s_w`` (``prepare(int_bias=)``); ``false``: float bias.
    """

    method: PrepareMethod = PrepareMethod.auto
    qat_mode: BnMode = BnMode.fuse_bn
    submodule: str = "model"
    int_bias: bool = True


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
