"""Prepare a LightningModule's network and reload quantized checkpoints strictly, with recipe bookkeeping.

The *recipe* of a prepared model is the dtype and observer of every quant node (:func:`recipe_of`). A
checkpoint made with a different recipe is refused with the nodes that differ (:func:`recipe_mismatch`), and
one made with other prepare settings (``qat_mode``, ``chip``: same dtypes, other numerics) is refused with the
settings that differ (:func:`prepare_settings_mismatch`). :func:`prepare_submodule` swaps
``pl_module.<submodule>`` for its prepared network (idempotent); :func:`load_quantized_checkpoint` prepares
first, with the checkpoint's settings, and then loads a quantized checkpoint with ``strict=True``.
The ``PrepareQuantization`` callback (``callbacks/prepare.py``) is built on these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from qat_lightning.callbacks._common import (
    check_choice,
    ensure_calibrated_flag,
    get_submodule,
    is_prepared,
    normalize_inputs,
    set_submodule,
)
from qat_lightning.chips import get_chip
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState, iter_fake_quantize, set_fake_quantize
from qat_lightning.quant.preparation.prepare import prepare
from qat_lightning.quant.qconfig.qconfig import QConfig
from qat_lightning.quant.qconfig.setter import QconfigSetter, as_qconfig_setter

__all__ = [
    "METHODS",
    "QAT_MODES",
    "build_setter",
    "checkpoint_prepare_state",
    "load_quantized_checkpoint",
    "prepare_settings_error",
    "prepare_settings_mismatch",
    "prepare_submodule",
    "recipe_digest",
    "recipe_error",
    "recipe_mismatch",
    "recipe_of",
]


METHODS = ("auto", "fx", "eager", "jit_strip")
QAT_MODES = ("fuse_bn", "with_bn", "freeze_bn")


def recipe_of(model: nn.Module) -> dict[str, str]:
    """Describe a prepared model's quantization: ``{quant node name: "<dtype>/<observer>"}``."""
    return {name: f"{node.dtype}/{node.observer_name}" for name, node in iter_fake_quantize(model)}


def recipe_digest(recipe: Mapping[str, str]) -> str:
    """Hash a recipe short and stable (kept next to it in the callback's ``state_dict``)."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(recipe.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def recipe_mismatch(ours: Mapping[str, str], theirs: Mapping[str, str], limit: int = 8) -> list[str]:
    """List the differences between two recipes (at most ``limit`` lines, then a count)."""
    lines = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name, "(absent)"), theirs.get(name, "(absent)")
        if a != b:
            lines.append(f"{name}: this run {a}, checkpoint {b}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines


def recipe_error(where: str, ours: Mapping[str, str], theirs: Mapping[str, str]) -> ValueError:
    """Build the error for a checkpoint (``where``) made with another recipe, naming the nodes that differ."""
    diff = "\n  ".join(recipe_mismatch(ours, theirs))
    return ValueError(
        f"{where} was made with a different quantization recipe than this run's:\n  {diff}\n"
        "Use the qconfig_setter / chip the checkpoint was made with, or start from the float weights "
        "(load them before prepare) instead of resuming."
    )


def _comparable(key: str, value: Any) -> Any:
    """Chip names compare case-insensitively (a ``ChipSpec`` by its name); other settings as they are."""
    if key == "chip" and value is not None:
        return str(getattr(value, "name", value)).strip().lower()
    return value


def prepare_settings_mismatch(
    saved: Mapping[str, Any], requested: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Compare the prepare settings stored in a checkpoint with the ones asked for now.

    Only the keys of ``requested`` are compared, and only where ``saved`` holds them (a checkpoint of an
    older version may lack one). ``None`` is a value like any other here: a caller that treats ``None`` as
    "not given" leaves that key out of ``requested``.

    Args:
        saved: the ``PrepareQuantization`` state stored in the checkpoint (``qat_mode``, ``chip``, ...).
        requested: the settings of this run / call.

    Returns:
        ``{setting: (checkpoint's value, requested value)}`` for every setting that differs.
    """
    return {
        key: (saved[key], value)
        for key, value in requested.items()
        if key in saved and _comparable(key, saved[key]) != _comparable(key, value)
    }


def prepare_settings_error(
    where: str, mismatch: Mapping[str, tuple[Any, Any]], uses: str, fix: str
) -> ValueError:
    """Build the error for a checkpoint (``where``) made with other prepare settings.

    Args:
        where: what was made with the settings (``"the checkpoint"``, ``"checkpoint run/last.ckpt"``).
        mismatch: what :func:`prepare_settings_mismatch` returned (not empty).
        uses: who asks for the other values (``"this run uses"``).
        fix: how to get past it.

    Returns:
        ``ValueError("<where> was made with PrepareQuantization(qat_mode='with_bn') but <uses>
        qat_mode='fuse_bn'; <fix>")``.
    """
    saved = ", ".join(f"{key}={theirs!r}" for key, (theirs, _) in mismatch.items())
    asked = ", ".join(f"{key}={ours!r}" for key, (_, ours) in mismatch.items())
    return ValueError(f"{where} was made with PrepareQuantization({saved}) but {uses} {asked}; {fix}")


def build_setter(qconfig_setter: Any, chip: str | None) -> QconfigSetter:
    """Return the ``QconfigSetter`` that ``prepare`` gets from a ``qconfig_setter`` argument and a chip.

    Raises:
        TypeError: for a setter of another type (the message lists what is accepted).
        ValueError: for an unknown chip (listing the known ones), or a chip other than the setter's own.
    """
    if isinstance(qconfig_setter, QConfig):
        qconfig_setter = QconfigSetter(reference_qconfig=qconfig_setter)
    setter = as_qconfig_setter(qconfig_setter)
    if chip is None:
        return setter
    chip = get_chip(chip).name
    if setter.chip is not None and setter.chip != chip:
        raise ValueError(
            f"chip={chip!r} disagrees with the qconfig_setter's chip {setter.chip!r}; give one of them"
        )
    return setter.with_chip(chip)


def prepare_submodule(
    pl_module: nn.Module,
    qconfig_setter: Any = None,
    example_inputs: Any = None,
    submodule: str = "model",
    method: str = "auto",
    qat_mode: str = "fuse_bn",
    chip: str | None = None,
    check_dir: str | Path | None = None,
    int_bias: bool = True,
) -> nn.Module:
    """Prepare ``pl_module.<submodule>`` in place of the float network and return the prepared network.

    Idempotent: a submodule that already holds quant nodes is returned as is. The prepared network gets the
    ``qat_calibrated`` buffer and is left in VALIDATION state (nothing observed until a callback says so).
    Call it from your LightningModule's ``on_load_checkpoint`` to make ``load_from_checkpoint`` strict::

        def on_load_checkpoint(self, checkpoint):
            prepare_submodule(self, setter, example_inputs=torch.zeros(2, 3, 32, 32))

    Args:
        pl_module: the module holding the network (a LightningModule or any ``nn.Module``).
        qconfig_setter: a ``QconfigSetter``, a ``QConfig`` or ``None`` (the default qconfig).
        example_inputs: positional args (a tuple, or one tensor) or keyword args (a dict) for tracing.
        submodule: attribute path of the network inside ``pl_module``.
        method: ``auto``, ``fx``, ``eager`` or ``jit_strip``.
        qat_mode: ``fuse_bn``, ``with_bn`` or ``freeze_bn``.
        chip: target chip (``j6e``, ``j6m``, ``j6p``) or ``None``.
        check_dir: where ``prepare`` writes ``model_check_result.txt`` (``None``: not written).
        int_bias: VALIDATION adds the deployed int32 bias of conv / linear (``prepare(int_bias=)``).

    Raises:
        ValueError: for an unknown method / qat_mode, missing example inputs, or what ``prepare`` rejects.
    """
    check_choice("method", method, METHODS)
    check_choice("qat_mode", qat_mode, QAT_MODES)
    model = get_submodule(pl_module, submodule)
    if is_prepared(model):
        ensure_calibrated_flag(model)
        return model
    if example_inputs is None:
        raise ValueError("prepare needs example_inputs (a tuple of positional args, one tensor, or a dict)")
    inputs = normalize_inputs(example_inputs)
    prepared = prepare(
        model,
        example_inputs=inputs,
        qconfig_setter=build_setter(qconfig_setter, chip),
        method=method,
        qat_mode=qat_mode,
        check_dir=None if check_dir is None else str(check_dir),
        int_bias=int_bias,
    )
    set_submodule(pl_module, submodule, prepared)
    ensure_calibrated_flag(prepared)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


def checkpoint_prepare_state(checkpoint: Mapping[str, Any], submodule: str) -> Mapping[str, Any] | None:
    """Return the ``PrepareQuantization`` state of ``submodule`` stored in a loaded checkpoint, or ``None``.

    The state holds ``submodule``, ``method``, ``qat_mode``, ``chip``, ``recipe`` and ``recipe_digest``
    (``PrepareQuantization.state_dict``); ``None`` for a checkpoint saved without the callback.
    """
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("PrepareQuantization") and isinstance(state, Mapping):
            if state.get("submodule") == submodule:
                return state
    return None


def _check_prepared_settings(model: nn.Module, where: str, settings: Mapping[str, Any]) -> None:
    """Refuse a network prepared before the call with another ``qat_mode`` / chip than the checkpoint's."""
    record = getattr(model, "prepare_record", None)
    if record is None:
        return
    built = {"qat_mode": record.qat_mode}
    if record.chip is not None and settings.get("chip") is not None:
        built["chip"] = record.chip
    mismatch = prepare_settings_mismatch(settings, built)
    if mismatch:
        raise prepare_settings_error(
            where,
            mismatch,
            "the network passed in is already prepared with",
            "pass an unprepared module (or the class) to prepare it with the checkpoint's settings",
        )


def _settings_for(
    stored: Mapping[str, Any], where: str, method: str | None, qat_mode: str | None, chip: str | None
) -> tuple[str, str, str | None]:
    """Fill the settings left unset from the checkpoint's; refuse a given one that differs from it."""
    if method is not None:
        check_choice("method", method, METHODS)
    if qat_mode is not None:
        check_choice("qat_mode", qat_mode, QAT_MODES)
    given = {"method": method, "qat_mode": qat_mode, "chip": chip}
    mismatch = prepare_settings_mismatch(stored, {k: v for k, v in given.items() if v is not None})
    if mismatch:
        keep = ", ".join(f"{key}={theirs!r}" for key, (theirs, _) in mismatch.items())
        raise prepare_settings_error(
            where,
            mismatch,
            "load_quantized_checkpoint was given",
            f"its scales were calibrated for those settings: pass {keep}, or leave "
            f"{' / '.join(mismatch)} unset (None) to use the checkpoint's",
        )
    return (
        method or stored.get("method") or "auto",
        qat_mode or stored.get("qat_mode") or "fuse_bn",
        chip if chip is not None else stored.get("chip"),
    )


def _check_init_kwargs(module: Any, init_kwargs: Mapping[str, Any]) -> None:
    """Refuse constructor arguments given with an instance: they could not take effect.

    Raises:
        TypeError: naming the arguments and the instance's class.
    """
    if init_kwargs and not isinstance(module, type):
        raise TypeError(
            f"load_quantized_checkpoint: init_kwargs ({', '.join(init_kwargs)}) apply to the class form only "
            f"(they build the module from the checkpoint's hyper-parameters); {type(module).__name__} was "
            "passed as an instance, built already. Pass the class, or build the instance with them"
        )


def _instance(
    module: Any, checkpoint: Mapping[str, Any], init_kwargs: Mapping[str, Any]
) -> pl.LightningModule:
    """Return an instance ``module`` as is; build a class from the checkpoint hparams and ``init_kwargs``."""
    if not isinstance(module, type):
        return module
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    return module(**{**hparams, **init_kwargs})


def load_quantized_checkpoint(
    module: pl.LightningModule | type[pl.LightningModule],
    ckpt_path: str | Path,
    qconfig_setter: Any = None,
    example_inputs: Any = None,
    submodule: str = "model",
    method: str | None = None,
    qat_mode: str | None = None,
    chip: str | None = None,
    map_location: Any = "cpu",
    int_bias: bool = True,
    **init_kwargs: Any,
) -> pl.LightningModule:
    """Rebuild a quantized LightningModule from a checkpoint of a quantized run, loading strictly.

    ``LightningModule.load_from_checkpoint`` builds the float network and would then fail on the quant
    buffers; this helper prepares first with the checkpoint's settings and recipe, then loads with
    ``strict=True``. The settings :class:`PrepareQuantization` stored (``method``, ``qat_mode``, ``chip``)
    fill those left ``None``; a given value that differs is refused (the scales were calibrated for the
    checkpoint's: a ``with_bn`` checkpoint loaded as ``fuse_bn`` would apply them to BN-folded weights), and
    so is another recipe (naming the nodes that differ), before ``module`` is changed.

    Args:
        module: a LightningModule instance, or its class (built from the checkpoint's hyper-parameters
            updated with ``init_kwargs``, like ``load_from_checkpoint``).
        ckpt_path: the ``.ckpt`` file.
        qconfig_setter: the setter used for the quantized run.
        example_inputs: example inputs for ``prepare`` (tuple, tensor or dict); ``None`` uses the module's
            ``example_input_array``.
        submodule: attribute path of the network.
        method: prepare method used for the run; ``None``: the checkpoint's (``"auto"`` if it has none).
        qat_mode: BN mode used for the run; ``None``: the checkpoint's (``"fuse_bn"`` if it has none).
        chip: target chip used for the run; ``None``: the checkpoint's (if any, else the setter's own).
        map_location: passed to ``torch.load``.
        int_bias: ``prepare(int_bias=)`` (not stored in the checkpoint: VALIDATION arithmetic only).
        **init_kwargs: constructor arguments overriding the saved hyper-parameters (class form only: with
            an instance they are refused, as they could not take effect).

    Returns:
        The module in eval mode, quant nodes in VALIDATION state.

    Raises:
        TypeError: ``init_kwargs`` given with an instance ``module`` (before anything is read or changed).
        ValueError: an unknown ``method`` / ``qat_mode``; a setting other than the checkpoint's (naming
            both values), also that of a ``module.<submodule>`` prepared already; another recipe.
            RuntimeError (from ``load_state_dict``) for other key mismatches.
    """
    _check_init_kwargs(module, init_kwargs)
    checkpoint = torch.load(str(ckpt_path), map_location=map_location, weights_only=False)
    where = f"checkpoint {ckpt_path}"
    stored = checkpoint_prepare_state(checkpoint, submodule) or {}
    method, qat_mode, chip = _settings_for(stored, where, method, qat_mode, chip)
    module = _instance(module, checkpoint, init_kwargs)
    original = get_submodule(module, submodule)
    if stored:
        _check_prepared_settings(original, where, stored)
    if example_inputs is None:
        example_inputs = getattr(module, "example_input_array", None)
    prepared = prepare_submodule(
        module,
        qconfig_setter,
        example_inputs,
        submodule=submodule,
        method=method,
        qat_mode=qat_mode,
        chip=chip,
        int_bias=int_bias,
    )
    ours = recipe_of(prepared)
    saved = stored.get("recipe")
    if saved is not None and dict(saved) != ours:
        if prepared is not original:  # leave the module as it was given
            set_submodule(module, submodule, original)
        raise recipe_error(where, ours, saved)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    if (restored := recipe_of(prepared)) != ours:
        raise recipe_error(where, ours, restored)
    module.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return module
