"""What each stage reads: the config sections and the ``callbacks.<name>`` it builds; ignored overrides.

:data:`STAGE_CALLBACKS` lists the ``callbacks.<name>`` each stage can build (through
:meth:`~qat_lightning.app.session.Session.callback`: ``calibrate`` builds prepare + calibration, ``qat``
prepare + calibration + qat, ``sanity`` those + sanity, ``analyze`` analysis; a test records the callbacks
real runs build and compares them with :func:`stage_callbacks`). :data:`STAGE_READS` adds them to the
config sections each stage reads.

With the composed config the answer narrows to what this run does (:func:`stage_reads`): ``stage=calibration``
analyses and searches only for a tuned recipe (:func:`tuning_analyses`, the rules of
``stage_runners.tune_recipe``), ``stage=qat`` runs its sanity check only with ``sanity=lr0|float``, the
pipeline skips what ``pipeline.sanity=false`` / ``pipeline.qat=false`` / ``export.enabled=false`` turn off.
:func:`ignored_overrides` names every command-line override (``+`` additions included) the run does not read.
"""

from __future__ import annotations

from collections.abc import Iterable

from qat_lightning.app.schema import AppConfig, RecipeConf, StageName

__all__ = [
    "FP16_RECIPES",
    "STAGE_CALLBACKS",
    "STAGE_READS",
    "fp16_step_wanted",
    "ignored_overrides",
    "stage_callbacks",
    "stage_reads",
    "tuning_analyses",
]

FP16_RECIPES = ("int16_fp16", "int8_int16_fp16")
"""The recipes whose tuning moves the ops most sensitive under int16 to fp16 (``recipe.fp16_topk``)."""

_ALL = ("prepare", "calibration", "qat", "sanity", "analysis")
STAGE_CALLBACKS: dict[StageName, tuple[str, ...]] = {
    StageName.float: (),
    StageName.calibration: ("prepare", "calibration", "analysis"),  # analysis: a tuned recipe's sensitivity
    # the QAT run's Calibration skips the calibrated checkpoint (unless callbacks.calibration.force=true)
    StageName.qat: ("prepare", "calibration", "qat", "sanity"),
    StageName.analysis: ("analysis",),  # the checkpoint is prepared from prepare.*, not callbacks.prepare
    StageName.pipeline: _ALL,
    StageName.troubleshoot: _ALL,
    StageName.export: (),  # ExportOnnx is built from export.*
}
"""The ``callbacks.<name>`` (``conf/callbacks/<name>.yaml``) each stage can build."""

_COMMON = (
    "model",
    "data",
    "trainer",
    "logger",
    "seed",
    "progress",
    "torch_threads",
    "target",
    "train.limit_val_batches",
    "prepare.submodule",
    "stage",
)
_QUANTIZED = (*_COMMON, "ckpt", "chip", "prepare")
_SANITY_RUNS = ("sanity.tolerance", "sanity.steps")
_QAT_SETTINGS = ("qat.lr", "qat.scheduler", "qat.scales", "qat.fix_scales")
"""What a QAT run reads besides its length (``qat.max_epochs`` / ``qat.max_steps``)."""
_TUNING = ("search", "analysis", "pipeline.fp16_max")
"""What a tuned recipe reads (``stage_runners.tune_recipe``)."""

_SECTIONS: dict[StageName, tuple[str, ...]] = {
    StageName.float: (*_COMMON, "train"),
    # float check after calibrating (sanity=float): mode and tolerance; ptq= runs after calibration
    StageName.calibration: (
        *_QUANTIZED, "recipe", "calibration", *_TUNING, "ptq", "sanity.mode", "sanity.tolerance",
    ),
    # the checkpoint is calibrated (Calibration skips): calibration.* is not read
    StageName.qat: (*_QUANTIZED, "qat", "sanity", "train.limit_train_batches"),
    StageName.analysis: (*_QUANTIZED, "analysis"),
    StageName.pipeline: (
        *_QUANTIZED, "recipe.module_names", "calibration", "search", "analysis", "pipeline", "train", "qat",
        "export", "ptq", *_SANITY_RUNS,
    ),
    # every run is sanity.steps batches of one epoch: qat.max_*, qat.lr_probe, qat.scale_trial and
    # train.limit_train_batches are not read; recipe tuning as stage=calibration (tune_recipe)
    StageName.troubleshoot: (
        *_QUANTIZED, "recipe", "calibration", *_TUNING, *_QAT_SETTINGS, *_SANITY_RUNS,
    ),
    StageName.export: (*_QUANTIZED, "export"),
}  # fmt: skip

STAGE_READS: dict[StageName, tuple[str, ...]] = {
    stage: (*sections, *(f"callbacks.{name}" for name in STAGE_CALLBACKS[stage]))
    for stage, sections in _SECTIONS.items()
}
"""The config keys (dotted prefixes) each stage can read; an override of any other key is ignored."""


# ----------------------------------------------------------------------------------------------- recipes
def fp16_step_wanted(recipe: RecipeConf) -> bool:
    """Return whether a recipe's tuning has an fp16 step (fp16 recipe, no ``fp16_ops``, ``fp16_topk != 0``).

    Args:
        recipe: the ``recipe`` section.
    """
    return recipe.name.value in FP16_RECIPES and not recipe.fp16_ops and recipe.fp16_topk != 0


def _fp16_search_runs(recipe: RecipeConf, fp16_max: int) -> bool:
    """Return whether the fp16 step runs (not with ``fp16_topk=null`` and ``pipeline.fp16_max=0``)."""
    return fp16_step_wanted(recipe) and not (recipe.fp16_topk is None and fp16_max < 1)


def tuning_analyses(recipe: RecipeConf, fp16_max: int) -> bool:
    """Return whether tuning the recipe analyses (the fp16 step, or a mixed recipe without a table).

    Args:
        recipe: the ``recipe`` section.
        fp16_max: ``pipeline.fp16_max``.
    """
    return _fp16_search_runs(recipe, fp16_max) or (recipe.mixed and not recipe.sensitivity_table)


# ----------------------------------------------------------------------------------------------- one run
_Narrowing = dict[str, tuple[tuple[str, ...], str]]
"""A read prefix -> (the part of it this run reads, why)."""


def _tuning_narrowing(cfg: AppConfig) -> _Narrowing:
    """``stage=calibration`` / ``troubleshoot``: what an untuned recipe does not read."""
    recipe, why = cfg.recipe, f"recipe={cfg.recipe.name.value} runs no"
    out: _Narrowing = {}
    if not tuning_analyses(recipe, cfg.pipeline.fp16_max):
        out["analysis"] = out["callbacks.analysis"] = ((), f"{why} sensitivity analysis")
    if not (fp16_step_wanted(recipe) or recipe.mixed):
        out["search"] = ((), f"{why} precision search")
    if not fp16_step_wanted(recipe):
        out["pipeline.fp16_max"] = ((), f"{why} fp16 step")
    return out


def _narrowing(stage: StageName, cfg: AppConfig) -> _Narrowing:
    """Return the prefixes of :data:`STAGE_READS` this run of ``stage`` reads in part (or not at all)."""
    out: _Narrowing = {}
    mode = cfg.sanity.mode.value
    if stage in (StageName.calibration, StageName.troubleshoot):
        out.update(_tuning_narrowing(cfg))
    if stage is StageName.calibration and mode != "float":
        out["sanity.tolerance"] = ((), f"sanity={mode} runs no check after calibration")
    if stage is StageName.qat and mode == "none":
        out["sanity"] = (("sanity.mode",), "sanity=none runs no sanity check")
        out["callbacks.sanity"] = ((), "sanity=none runs no sanity check")
    if stage is StageName.pipeline:
        p = cfg.pipeline
        if not p.sanity:
            for key in (*_SANITY_RUNS, "callbacks.sanity"):
                out[key] = ((), "pipeline.sanity=false runs no sanity check")
        if not (p.qat or p.sanity):
            why = "pipeline.qat=false and pipeline.sanity=false run no QAT"
            out["qat"], out["callbacks.qat"] = ((), why), ((), why)
        if not cfg.export.enabled:
            out["export"] = (("export.enabled",), "export.enabled=false runs no export")
    return out


def stage_reads(stage: StageName, cfg: AppConfig | None = None) -> tuple[str, ...]:
    """Return the config keys (dotted prefixes) ``stage`` reads: all it can read, or this run's with ``cfg``.

    Args:
        stage: the stage.
        cfg: the composed configuration of the run (``None``: :data:`STAGE_READS`).
    """
    narrowing = {} if cfg is None else _narrowing(stage, cfg)
    return tuple(key for p in STAGE_READS[stage] for key in narrowing.get(p, ((p,), ""))[0])


def stage_callbacks(stage: StageName, cfg: AppConfig | None = None) -> tuple[str, ...]:
    """Return the ``callbacks.<name>`` names ``stage`` builds: all it can build, or this run's with ``cfg``.

    Args:
        stage: the stage.
        cfg: the composed configuration of the run.
    """
    reads = stage_reads(stage, cfg)
    return tuple(name for name in STAGE_CALLBACKS[stage] if f"callbacks.{name}" in reads)


# ----------------------------------------------------------------------------------------------- overrides
def _override_key(override: str) -> str | None:
    """``+qat.lr=1`` -> ``qat.lr``; ``recipe=int16`` -> ``recipe``; ``None`` for Hydra's own keys."""
    key = override.split("=", 1)[0].lstrip("+~").strip()
    if not key or key.startswith("hydra.") or key == "hydra" or "/" in key:
        return None
    return key.split("@", 1)[0]


def _within(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _reason(key: str, narrowing: _Narrowing) -> str:
    """`` (why)`` when a config-dependent rule leaves ``key`` unread, else ``""``."""
    whys = [why for prefix, (_, why) in narrowing.items() if _within(key, prefix)]
    return f" ({whys[0]})" if whys else ""


def ignored_overrides(stage: StageName, overrides: Iterable[str], cfg: AppConfig | None = None) -> list[str]:
    """Return one line per override that ``stage`` ignores (whole or in part).

    Args:
        stage: the chosen stage.
        overrides: the command line's ``key=value`` / ``group=option`` strings.
        cfg: the composed configuration: with it, what this run does not read (``recipe=int8`` runs no
            analysis) is named too; without it, only what the stage never reads. A group choice
            (``sanity=none``) sets what the run reads, so it is judged by what the stage can read.
    """
    narrowing = {} if cfg is None else _narrowing(stage, cfg)
    run_reads, lines = stage_reads(stage, cfg), []
    for override in overrides:
        key = _override_key(override)
        reads = run_reads if key is None or "." in key else STAGE_READS[stage]
        if key is None or any(_within(key, p) for p in reads):
            continue
        parts = [p for p in reads if p.startswith(key + ".")]
        if parts:
            lines.append(f"{override}: stage={stage.value} reads only {', '.join(parts)} of it")
        else:
            lines.append(f"{override}: stage={stage.value} does not read {key}{_reason(key, narrowing)}")
    return lines
