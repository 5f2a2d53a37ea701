"""Checks of a composed configuration, before anything runs: value ranges and overrides a stage ignores.

:func:`check_config` range-checks every number and choice the schema's types cannot express (``qat.lr > 0``,
``calibration.num_batches >= 1``, ``target.ratio_of_float`` in ``(0, 1]``, the observer options and the
``recipe.module_names`` rules, validated by the core's own constructors) and raises one
:class:`ConfigError` listing every problem as ``key=value: allowed``. ``qat-lightning`` turns it into exit
code 2.

:func:`ignored_overrides` (from :mod:`qat_lightning.app.stage_reads`) names the command-line overrides the
chosen stage does not read (``qat.lr=...`` with ``stage=float``), so that a setting is never accepted and
silently ignored. In the same spirit a ``trainer.*`` key that the stages set themselves
(``trainer.max_steps``: use ``train.max_steps`` / ``qat.max_steps``) is refused
(:func:`~qat_lightning.app.trainer_args.stage_trainer_problems`), and so is a ``callbacks.prepare.chip``
that contradicts ``chip=``.

Nothing here imports hydra; the checks that need the user's model and checkpoints are in
``qat_lightning.app.preflight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qat_lightning.app.schema import AppConfig, QatScales, StageName
from qat_lightning.app.stage_reads import STAGE_CALLBACKS, STAGE_READS, ignored_overrides
from qat_lightning.app.trainer_args import stage_trainer_problems
from qat_lightning.callbacks.qat import FIX_TO_SCALES
from qat_lightning.quant.export.opsets import EXPORT_OPSETS

__all__ = [
    "RUNTIME_ARGS",
    "STAGE_READS",
    "TRIAL_SCALES",
    "ConfigError",
    "check_config",
    "config_problems",
    "ignored_overrides",
    "qat_scales",
]


class ConfigError(ValueError):
    """A configuration the app cannot run, explained for the user (``qat-lightning`` exits with 2)."""


# ----------------------------------------------------------------------------------------------- ranges
def _positive(value: Any) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: value is not None and value >= low


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _steps(value: Any) -> bool:
    return value == -1 or (value is not None and value >= 1)


def _batch_limit(value: Any) -> bool:
    return value is None or (value > 0 and (value <= 1 or float(value).is_integer()))


_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("qat.lr", _optional(_positive), "a number > 0, or null to keep the model's LR"),
    ("qat.max_epochs", _steps, "an int >= 1, or -1 (train by qat.max_steps)"),
    ("qat.max_steps", _steps, "an int >= 1, or -1 (train by qat.max_epochs)"),
    ("qat.lr_probe.steps", _at_least(1), "an int >= 1"),
    ("train.max_epochs", _steps, "an int >= 1, or -1 (train by train.max_steps)"),
    ("train.max_steps", _steps, "an int >= 1, or -1 (train by train.max_epochs)"),
    ("train.limit_train_batches", _batch_limit, "a share in (0, 1], a batch count >= 1, or null"),
    ("train.limit_val_batches", _batch_limit, "a share in (0, 1], a batch count >= 1, or null"),
    ("calibration.num_batches", _at_least(1), "an int >= 1"),
    ("sanity.tolerance", lambda v: v >= 0 and math.isfinite(v), "a number >= 0"),
    ("sanity.steps", _at_least(1), "an int >= 1"),
    ("target.ratio_of_float", lambda v: 0 < v <= 1, "a share in (0, 1] of the float metric"),
    ("target.value", _optional(math.isfinite), "a finite number, or null (use target.ratio_of_float)"),
    (
        "recipe.int16_ratio",
        _optional(lambda v: v >= 0 and (v < 1 or float(v).is_integer())),
        "a share in [0, 1), a row count >= 1, or null (searched)",
    ),
    ("recipe.fp16_topk", _optional(_at_least(0)), "an int >= 0, or null (searched)"),
    ("pipeline.fp16_max", _at_least(0), "an int >= 0"),
    ("search.eval_batches", _optional(_at_least(1)), "an int >= 1, or null (all)"),
    ("search.cache_budget_mb", _positive, "a number > 0 (megabytes)"),
    ("analysis.num_steps", _optional(_at_least(1)), "an int >= 1, or null (all)"),
    ("torch_threads", _optional(_at_least(1)), "an int >= 1, or null (torch's default)"),
    ("export.check_batches", _optional(_at_least(0)), "an int >= 0 (0: no check), or null (all)"),
    ("export.opset", lambda v: v in EXPORT_OPSETS, f"one of {', '.join(map(str, EXPORT_OPSETS))}"),
)


# ----------------------------------------------------------------------------------------------- QAT scales
_FIX_TO_SCALES = {"none": "moving", **FIX_TO_SCALES}
"""The old ``fix_scales`` names as scale modes (the QAT callback's map, plus ``qat.fix_scales=none``)."""

TRIAL_SCALES = ("moving", "fixed_input_output")
"""The two QAT scale modes ``qat.scale_trial`` compares (the seed's QAT §2: updated / input-output fixed)."""

_TRIAL_STAGES = (StageName.qat, StageName.pipeline)

RUNTIME_ARGS: dict[str, dict[str, str]] = {
    "prepare": {"qconfig_setter": "recipe= (stage=qat / analysis: the checkpoint's recipe)"},
    "qat": {"scales": "qat.scales", "fix_scales": "qat.scales", "float_steps": "the float checkpoint"},
    "sanity": {"mode": "sanity=", "reference": "the checked run's metric", "monitor_mode": "target.mode"},
}
"""The callback arguments each stage passes at run time (``conf/callbacks/<name>.yaml`` does not set them),
with the config they come from: the same key in ``callbacks.<name>`` would be overridden, so it is refused."""


def qat_scales(cfg: AppConfig) -> str:
    """Return the QAT scale mode the config asks for: ``qat.scales``, else the old ``qat.fix_scales``.

    Args:
        cfg: the composed configuration (a contradiction of the two keys is a :func:`config_problems` line).
    """
    q = cfg.qat
    return q.scales.value if q.scales.value != "moving" else _FIX_TO_SCALES[q.fix_scales.value]


def _scales_source(cfg: AppConfig) -> str:
    """``qat.scales=...`` / ``qat.fix_scales=...``: the key (and value) the scale mode comes from."""
    q = cfg.qat
    if q.scales.value == "moving" and q.fix_scales.value != "none":
        return f"qat.fix_scales={q.fix_scales.value}"
    return f"qat.scales={q.scales.value}"


def _yaml_scales(node: dict[str, Any], problems: list[str]) -> str | None:
    """Return the scale mode ``callbacks.qat`` asks for (``scales``, else ``fix_scales``).

    Args:
        node: the composed ``callbacks.qat``.
        problems: an unknown value is added here (and ``None`` returned).
    """
    scales = node.get("scales")
    if scales is not None:
        allowed = [c.value for c in QatScales]
        if scales in allowed:
            return str(scales)
        problems.append(f"callbacks.qat.scales={scales!r}: allowed: {', '.join(allowed)}")
        return None
    fix = node.get("fix_scales")
    if fix in (None, "input_output", "all"):
        return _FIX_TO_SCALES[fix]
    problems.append(f"callbacks.qat.fix_scales={fix!r}: allowed: null, input_output, all")
    return None


def _scale_problems(cfg: AppConfig) -> list[str]:
    """``qat.scales`` against the old ``qat.fix_scales`` and ``qat.scale_trial``."""
    q, problems = cfg.qat, []
    if q.scales.value != "moving" and q.fix_scales.value != "none":
        if _FIX_TO_SCALES[q.fix_scales.value] != q.scales.value:
            problems.append(
                f"qat.fix_scales={q.fix_scales.value} contradicts qat.scales={q.scales.value}: set only "
                "qat.scales (fix_scales is its old name: none=moving, input_output=fixed_input_output, "
                "all=fixed)"
            )
    if q.scale_trial and cfg.stage.name in _TRIAL_STAGES and qat_scales(cfg) not in TRIAL_SCALES:
        problems.append(
            f"qat.scale_trial=true with {_scales_source(cfg)}: the trial compares qat.scales=moving and "
            f"fixed_input_output (and runs with qat.scales alone when the calibration misses the target); "
            f"allowed with the trial: qat.scales={' or '.join(TRIAL_SCALES)}; or set qat.scale_trial=false"
        )
    return problems


def _callback_scale_problem(cfg: AppConfig, node: dict[str, Any]) -> list[str]:
    """``callbacks.qat.scales`` / ``fix_scales`` against the scale mode the stage passes at run time."""
    keys = [key for key in ("scales", "fix_scales") if key in node]
    if not keys:
        return []
    problems: list[str] = []
    theirs = _yaml_scales(node, problems)
    shown = ", ".join(f"callbacks.qat.{key}={node[key]!r}" for key in keys)
    fix = f"set qat.scales={theirs} and drop {shown}" if theirs else f"drop {shown}"
    if cfg.qat.scale_trial and cfg.stage.name in _TRIAL_STAGES:
        problems.append(
            f"{shown} conflicts with qat.scale_trial=true, which runs QAT with scales="
            f"{' and '.join(TRIAL_SCALES)}: the stage passes the scale mode at run time (from qat.scales); "
            f"drop {shown}"
        )
    elif theirs is not None and theirs != qat_scales(cfg):
        problems.append(
            f"{shown} conflicts with {_scales_source(cfg)}: the stage passes scales={qat_scales(cfg)} "
            f"(from qat.scales) to the QAT callback at run time; {fix}"
        )
    return problems


def _runtime_arg_problems(cfg: AppConfig) -> list[str]:
    """Keys of ``callbacks.<name>`` that the stage also passes at run time (:data:`RUNTIME_ARGS`).

    Only the callbacks the stage can build are checked (:data:`STAGE_CALLBACKS`): another is only warned
    about (an ignored override).
    """
    built = STAGE_CALLBACKS[cfg.stage.name]
    problems = []
    for name, args in RUNTIME_ARGS.items():
        node = (cfg.callbacks.get(name) or {}) if name in built else {}
        for key, source in args.items():
            if key in node and not (name == "qat" and key in ("scales", "fix_scales")):
                problems.append(
                    f"callbacks.{name}.{key}={node[key]!r}: the stage passes {key} at run time (from "
                    f"{source}), which would override it; drop it"
                )
    qat = (cfg.callbacks.get("qat") or {}) if "qat" in built else {}
    return problems + _callback_scale_problem(cfg, qat) + _callback_chip_problem(cfg)


def _callback_chip_problem(cfg: AppConfig) -> list[str]:
    """``callbacks.prepare.chip`` against ``chip=``: a contradiction is refused, never resolved silently.

    The stage builds the qconfig setter for ``chip=`` (the recipe's chip rules, the checkpoint's chip) and
    passes it to the prepare callback at run time; a ``chip`` argument naming another chip would make the
    callback raise once the run has started. An equal value (any case) is harmless.
    """
    from qat_lightning.chips import get_chip

    built = STAGE_CALLBACKS[cfg.stage.name]
    node = (cfg.callbacks.get("prepare") or {}) if "prepare" in built else {}
    chip = node.get("chip")
    if chip is None:
        return []
    try:
        theirs = get_chip(chip).name
    except (ValueError, TypeError) as err:
        return [f"callbacks.prepare.chip={chip!r}: {err}"]
    ours = cfg.chip.name.value
    if theirs == ours:
        return []
    return [
        f"callbacks.prepare.chip={chip!r} contradicts chip={ours}: the stage builds the qconfig for "
        f"chip={ours} (recipe= under its chip rules) and passes it to the prepare callback at run time; "
        f"pass chip={theirs} to target {theirs}, or drop callbacks.prepare.chip"
    ]


def _get(cfg: AppConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _core_check(problems: list[str], key: str, value: Any, build: Callable[[], Any]) -> None:
    """Run a core constructor on a config value; its error (listing the allowed values) is the problem."""
    try:
        build()
    except (ValueError, TypeError) as err:
        problems.append(f"{key}={value!r}: {err}")


def config_problems(cfg: AppConfig) -> list[str]:
    """Return one line per out-of-range value of ``cfg`` (empty: the config is runnable).

    Args:
        cfg: the composed configuration.
    """
    from qat_lightning.analysis.compare.metrics import BUILTIN_METRICS
    from qat_lightning.quant import make_observer
    from qat_lightning.quant.qconfig.templates import ModuleNameTemplate

    problems = [
        f"{key}={_get(cfg, key)!r}: must be {allowed}"
        for key, ok, allowed in _RULES
        if not ok(_get(cfg, key))
    ]
    if not all(_positive(lr) for lr in cfg.qat.lr_probe.lrs):
        problems.append(f"qat.lr_probe.lrs={list(cfg.qat.lr_probe.lrs)}: every LR must be a number > 0")
    c = cfg.calibration
    _core_check(
        problems,
        "calibration.observer_kwargs",
        dict(c.observer_kwargs),
        lambda: make_observer(c.observer.value, **dict(c.observer_kwargs)),
    )
    names = dict(cfg.recipe.module_names)
    _core_check(problems, "recipe.module_names", names, lambda: names and ModuleNameTemplate(names))
    unknown = [m for m in cfg.analysis.metrics if str(m).upper() not in BUILTIN_METRICS]
    if unknown:
        problems.append(
            f"analysis.metrics={list(cfg.analysis.metrics)}: unknown {unknown}; allowed: "
            f"{', '.join(BUILTIN_METRICS)}"
        )
    table = cfg.recipe.sensitivity_table
    if table and not Path(table).expanduser().is_file():
        problems.append(f"recipe.sensitivity_table={table!r}: no such file")
    if cfg.ckpt and not Path(cfg.ckpt).expanduser().is_file():
        problems.append(f"ckpt={cfg.ckpt!r}: no such file")
    problems += _scale_problems(cfg) + _runtime_arg_problems(cfg)
    problems += stage_trainer_problems(cfg.trainer, cfg.progress)
    if not cfg.prepare.submodule or not all(p.isidentifier() for p in cfg.prepare.submodule.split(".")):
        problems.append(
            f"prepare.submodule={cfg.prepare.submodule!r}: must be an attribute path (e.g. model)"
        )
    return problems


def check_config(cfg: AppConfig, extra: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` listing every problem :func:`config_problems` finds.

    Args:
        cfg: the composed configuration.
        extra: more problem lines found by the caller.

    Raises:
        ConfigError: one line per problem, ``key=value: what is allowed``.
    """
    problems = [*config_problems(cfg), *extra]
    if problems:
        lines = "\n  ".join(problems)
        raise ConfigError(f"invalid configuration ({len(problems)} problem(s)):\n  {lines}")
