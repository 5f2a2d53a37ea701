"""``PrepareQuantization``: model surgery in ``setup()``, recipe bookkeeping, strict reload of checkpoints.

The surgery runs in ``setup()``: after the datamodule is set up, before Lightning restores a checkpoint
and before it builds the optimizers, so ``configure_optimizers`` sees the prepared parameters and a
quantized checkpoint loads into a model of the same structure. It is idempotent: a submodule that already
holds quant nodes is left alone (a second ``trainer.fit`` with the same module does not prepare twice).

The *recipe* of a prepared model is the dtype and observer of every quant node. It is kept (as plain
strings) in the callback's ``state_dict``; a checkpoint made with a different recipe is refused with the
nodes that differ, and so is a checkpoint whose restored dtypes disagree with this run's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from qat_lightning.callbacks._common import (
    InputFn,
    check_choice,
    default_input_fn,
    ensure_calibrated_flag,
    first_batch,
    get_submodule,
    is_prepared,
    normalize_inputs,
    request_dataloader,
    resolve_log_dir,
    set_submodule,
    switch_states,
)
from qat_lightning.callbacks.logging import dtype_ratios, log_scalars, log_text
from qat_lightning.chips import get_chip
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState, iter_fake_quantize, set_fake_quantize
from qat_lightning.quant.preparation.model_check import check_model
from qat_lightning.quant.preparation.prepare import prepare
from qat_lightning.quant.qconfig.qconfig import QConfig
from qat_lightning.quant.qconfig.setter import QconfigSetter, as_qconfig_setter

__all__ = [
    "METHODS",
    "QAT_MODES",
    "PrepareQuantization",
    "prepare_submodule",
    "load_quantized_checkpoint",
    "recipe_of",
    "recipe_mismatch",
]

METHODS = ("auto", "fx", "eager", "jit_strip")
QAT_MODES = ("fuse_bn", "with_bn", "freeze_bn")
_EVAL_GUARDED = (FakeQuantState.QAT, FakeQuantState.CALIBRATION)


# ----------------------------------------------------------------------------------------------- recipe
def recipe_of(model: nn.Module) -> dict[str, str]:
    """Describe a prepared model's quantization: ``{quant node name: "<dtype>/<observer>"}``."""
    return {name: f"{node.dtype}/{node.observer_name}" for name, node in iter_fake_quantize(model)}


def _digest(recipe: Mapping[str, str]) -> str:
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


def _recipe_error(where: str, ours: Mapping[str, str], theirs: Mapping[str, str]) -> ValueError:
    diff = "\n  ".join(recipe_mismatch(ours, theirs))
    return ValueError(
        f"{where} was made with a different quantization recipe than this run's:\n  {diff}\n"
        "Use the qconfig_setter / chip the checkpoint was made with, or start from the float weights "
        "(load them before prepare) instead of resuming."
    )


# ----------------------------------------------------------------------------------------------- core calls
def _build_setter(qconfig_setter: Any, chip: str | None) -> QconfigSetter:
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
        qconfig_setter=_build_setter(qconfig_setter, chip),
        method=method,
        qat_mode=qat_mode,
        check_dir=None if check_dir is None else str(check_dir),
    )
    set_submodule(pl_module, submodule, prepared)
    ensure_calibrated_flag(prepared)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


def _checkpoint_recipe(checkpoint: Mapping[str, Any], submodule: str) -> Mapping[str, str] | None:
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("PrepareQuantization") and state.get("submodule") == submodule:
            return state.get("recipe")
    return None


def load_quantized_checkpoint(
    module: pl.LightningModule | type[pl.LightningModule],
    ckpt_path: str | Path,
    qconfig_setter: Any = None,
    example_inputs: Any = None,
    submodule: str = "model",
    method: str = "auto",
    qat_mode: str = "fuse_bn",
    chip: str | None = None,
    map_location: Any = "cpu",
    **init_kwargs: Any,
) -> pl.LightningModule:
    """Rebuild a quantized LightningModule from a checkpoint of a quantized run, loading strictly.

    ``LightningModule.load_from_checkpoint`` builds the float network and would then fail on the quant
    buffers; this helper prepares first with the same recipe, then loads the checkpoint with
    ``strict=True``. The recipe stored by :class:`PrepareQuantization` in the checkpoint is compared with the
    one built here (a clear error names the nodes that differ).

    Args:
        module: a LightningModule instance, or its class (built from the checkpoint's hyper-parameters
            updated with ``init_kwargs``, like ``load_from_checkpoint``).
        ckpt_path: the ``.ckpt`` file.
        qconfig_setter: the setter used for the quantized run.
        example_inputs: example inputs for ``prepare`` (tuple, tensor or dict); ``None`` uses the module's
            ``example_input_array``.
        submodule: attribute path of the network.
        method: prepare method used for the run.
        qat_mode: BN mode used for the run.
        chip: target chip used for the run.
        map_location: passed to ``torch.load``.
        **init_kwargs: constructor arguments overriding the saved hyper-parameters (class form only).

    Returns:
        The module in eval mode, quant nodes in VALIDATION state.

    Raises:
        ValueError: for a different recipe; RuntimeError (from ``load_state_dict``) for other key mismatches.
    """
    checkpoint = torch.load(str(ckpt_path), map_location=map_location, weights_only=False)
    if isinstance(module, type):
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        module = module(**{**hparams, **init_kwargs})
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
    )
    ours = recipe_of(prepared)
    saved = _checkpoint_recipe(checkpoint, submodule)
    if saved is not None and dict(saved) != ours:
        raise _recipe_error(f"checkpoint {ckpt_path}", ours, saved)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    restored = recipe_of(prepared)
    if restored != ours:
        raise _recipe_error(f"checkpoint {ckpt_path}", ours, restored)
    module.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return module


# ----------------------------------------------------------------------------------------------- callback
class PrepareQuantization(Callback):
    r"""Turn ``pl_module.<submodule>`` into a quantized (QAT / calibration) network in ``setup()``.

    Writes ``model_check_result.txt`` into the run's log dir (rank zero), logs the dtype summary (text and
    the ``quant/ratio_<dtype>`` scalars) and keeps validation, test and predict from ever changing observers:
    at their start every node still in QAT or CALIBRATION state is put in VALIDATION.

    Args:
        qconfig_setter: a ``QconfigSetter`` (templates, chip), a ``QConfig``, or ``None`` for the default.
        example_inputs: inputs used to trace the network: a tuple of positional args, one tensor or a dict of
            keyword args. ``None``: the LightningModule's ``example_input_array``, else ``input_fn`` of the
            first batch of the datamodule's (or the LightningModule's) ``train_dataloader()``. When the run
            has neither (dataloaders passed to ``trainer.fit`` directly), ``example_inputs`` is required.
        submodule: attribute path of the network inside the LightningModule (``"model"``, ``"net.backbone"``).
        method: ``"auto"`` (fx, falling back to eager), ``"fx"``, ``"eager"`` or ``"jit_strip"``.
        qat_mode: ``"fuse_bn"``, ``"with_bn"`` or ``"freeze_bn"``.
        chip: target chip (``"j6e"``, ``"j6m"``, ``"j6p"``), or ``None`` (the setter's own, if any).
        input_fn: turns a batch into model inputs (default: tensor / first element / dict as kwargs).

    Example::

        trainer = Trainer(callbacks=[PrepareQuantization(setter), Calibration(num_batches=50)], max_epochs=0)
        trainer.fit(lit_module, datamodule=dm)   # calibration-only run

    Raises:
        ValueError: at construction for an unknown ``method`` / ``qat_mode``; when restoring a checkpoint made
            with a different recipe.
    """

    def __init__(
        self,
        qconfig_setter: Any = None,
        example_inputs: Any = None,
        submodule: str = "model",
        method: str = "auto",
        qat_mode: str = "fuse_bn",
        chip: str | None = None,
        input_fn: InputFn | None = None,
    ) -> None:
        super().__init__()
        check_choice("method", method, METHODS)
        check_choice("qat_mode", qat_mode, QAT_MODES)
        self.qconfig_setter = qconfig_setter
        self.example_inputs = example_inputs
        self.submodule = submodule
        self.method = method
        self.qat_mode = qat_mode
        self.chip = chip
        self.input_fn: Callable[[Any], Any] = input_fn or default_input_fn
        self.recipe: dict[str, str] = {}
        self.prepared_here = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (one per submodule)."""
        return self._generate_state_key(submodule=self.submodule)

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepare the network (once) before checkpoint restore and optimizer creation."""
        log_dir = resolve_log_dir(trainer)  # every rank: Lightning broadcasts it
        model = get_submodule(pl_module, self.submodule)
        if not is_prepared(model):
            model = prepare_submodule(
                pl_module,
                self.qconfig_setter,
                self._example_inputs(trainer, pl_module, model, stage),
                submodule=self.submodule,
                method=self.method,
                qat_mode=self.qat_mode,
                chip=self.chip,
                check_dir=log_dir if trainer.is_global_zero else None,
            )
            self.prepared_here = True
            self._report(trainer, model, log_dir)
        else:
            ensure_calibrated_flag(model)
        self.recipe = recipe_of(model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that a restored checkpoint kept this run's recipe."""
        self._verify(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze observers for validation."""
        self._evaluation_start(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze observers for testing."""
        self._evaluation_start(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze observers for prediction."""
        self._evaluation_start(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Plain config: submodule, method, qat_mode, chip and the recipe (node -> dtype/observer)."""
        return {
            "submodule": self.submodule,
            "method": self.method,
            "qat_mode": self.qat_mode,
            "chip": self.chip,
            "recipe_digest": _digest(self.recipe),
            "recipe": dict(self.recipe),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint made with another recipe (called by Lightning after ``setup``)."""
        for key in ("qat_mode", "chip"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint was made with PrepareQuantization({key}={state_dict[key]!r}) but this "
                    f"run uses {key}={getattr(self, key)!r}; use the same setting to resume"
                )
        saved = state_dict.get("recipe")
        if saved is not None and self.recipe and dict(saved) != self.recipe:
            raise _recipe_error("the checkpoint", self.recipe, saved)

    # ---------------------------------------------------------------------------------------------- helpers
    def _evaluation_start(self, pl_module: pl.LightningModule) -> None:
        model = self._verify(pl_module)
        switch_states(model, _EVAL_GUARDED, FakeQuantState.VALIDATION)

    def _verify(self, pl_module: pl.LightningModule) -> nn.Module:
        model = get_submodule(pl_module, self.submodule)
        current = recipe_of(model)
        if self.recipe and current != self.recipe:
            raise _recipe_error("the restored checkpoint", self.recipe, current)
        return model

    def _example_inputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, stage: str
    ) -> Any:
        inputs = self.example_inputs
        if inputs is None:
            inputs = getattr(pl_module, "example_input_array", None)
        if inputs is None:
            inputs = self.input_fn(first_batch(self._loader(trainer, pl_module, stage)))
        device = next((p.device for p in model.parameters()), None)
        inputs = normalize_inputs(inputs)
        if device is not None:
            from lightning.fabric.utilities.apply_func import move_data_to_device

            inputs = move_data_to_device(inputs, device)
        return inputs

    @staticmethod
    def _loader(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        splits = ["train"] + {"validate": ["val"], "test": ["test"]}.get(stage, ["val", "test"])
        errors = []
        for split in splits:
            try:
                return request_dataloader(trainer, pl_module, split)
            except Exception as err:  # noqa: BLE001 - try the next split, report all at the end
                errors.append(f"{split}: {err}")
        raise ValueError(
            "PrepareQuantization needs example inputs: pass example_inputs=..., set the LightningModule's "
            "example_input_array, or attach a datamodule with a train_dataloader(). Tried:\n  "
            + "\n  ".join(errors)
        )

    def _report(self, trainer: pl.Trainer, model: nn.Module, log_dir: Path) -> None:
        scalars = {f"quant/ratio_{k}": v for k, v in dtype_ratios(model).items()}
        summary = ", ".join(f"{k[len('quant/ratio_') :]} {v:.1%}" for k, v in scalars.items() if v > 0)
        try:
            rows = check_model(model).dtype_summary
        except Exception:  # noqa: BLE001 - a hand-prepared model has no check report; the ratios remain
            rows = ()
        if rows:
            total_ops = sum(r.ops for r in rows) or 1
            scalars = {f"quant/ratio_{r.dtype}": r.ops / total_ops for r in rows}
            scalars.update({f"quant/flop_share_{r.dtype}": r.flop_share for r in rows})
            summary = ", ".join(f"{r.dtype} {r.ops} ops / {r.flop_share:.1%} FLOPs" for r in rows if r.ops)
        rank_zero_info(
            f"PrepareQuantization: prepared `{self.submodule}` ({summary}); check report in {log_dir}"
        )
        log_scalars(trainer, scalars, step=0)
        report = log_dir / "model_check_result.txt"
        if trainer.is_global_zero and report.is_file():
            log_text(trainer, "quant/model_check", report.read_text(encoding="utf-8")[:100_000], step=0)
