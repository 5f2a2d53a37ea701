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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from qat_lightning.callbacks._checks import check_callable, check_submodule, require_bool
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
    switch_states,
)
from qat_lightning.callbacks.logging import dtype_ratios, log_scalars, log_text
from qat_lightning.callbacks.prepared_model import (
    METHODS,
    QAT_MODES,
    build_setter,
    load_quantized_checkpoint,
    prepare_settings_error,
    prepare_settings_mismatch,
    prepare_submodule,
    recipe_digest,
    recipe_error,
    recipe_mismatch,
    recipe_of,
)
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState
from qat_lightning.quant.preparation.model_check import check_model

__all__ = [
    "METHODS",
    "QAT_MODES",
    "PrepareQuantization",
    "prepare_submodule",
    "load_quantized_checkpoint",
    "recipe_of",
    "recipe_mismatch",
]

_EVAL_GUARDED = (FakeQuantState.QAT, FakeQuantState.CALIBRATION)


def _check_setter(qconfig_setter: Any, chip: Any) -> None:
    """Refuse at construction what ``setup()`` would: a setter of another type, an unknown or clashing chip.

    Raises:
        TypeError: a ``qconfig_setter`` that is no setter, template or QConfig (the message lists them).
        ValueError: an unknown chip (the message lists the known ones), or one other than the setter's own.
    """
    try:
        build_setter(qconfig_setter, chip)
    except (TypeError, ValueError) as err:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"PrepareQuantization: {err}") from None


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
        chip: target chip (a name of :data:`qat_lightning.chips.CHIPS`: ``"j6e"``, ``"j6m"``, ``"j6p"``), or
            ``None`` (the setter's own, if any).
        input_fn: turns a batch into model inputs (default: tensor / first element / dict as kwargs).
        int_bias: VALIDATION adds the deployed int32 bias of conv / linear (``prepare(int_bias=)``).

    Example::

        trainer = Trainer(callbacks=[PrepareQuantization(setter), Calibration(num_batches=50)], max_epochs=0)
        trainer.fit(lit_module, datamodule=dm)   # calibration-only run

    Raises:
        ValueError: at construction for an unknown ``method`` / ``qat_mode`` / ``chip`` (the message lists
            the known chips) or a ``chip`` other than the setter's own; when restoring a checkpoint made with
            a different recipe.
        TypeError: at construction for a ``qconfig_setter`` of another type (``"int8"``), a non-bool
            ``int_bias``, a non-callable ``input_fn`` or a non-str submodule.
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
        int_bias: bool = True,
    ) -> None:
        super().__init__()
        who = "PrepareQuantization"
        self.int_bias = require_bool("int_bias", int_bias, who)
        check_choice("method", method, METHODS)
        check_choice("qat_mode", qat_mode, QAT_MODES)
        _check_setter(qconfig_setter, chip)
        self.qconfig_setter = qconfig_setter
        self.example_inputs = example_inputs
        self.submodule = check_submodule(submodule, who)
        self.method = method
        self.qat_mode = qat_mode
        self.chip = chip
        self.input_fn: Callable[[Any], Any] = check_callable("input_fn", input_fn, who) or default_input_fn
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
                int_bias=self.int_bias,
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
            "recipe_digest": recipe_digest(self.recipe),
            "recipe": dict(self.recipe),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint made with another recipe (called by Lightning after ``setup``)."""
        mismatch = prepare_settings_mismatch(state_dict, {"qat_mode": self.qat_mode, "chip": self.chip})
        if mismatch:
            raise prepare_settings_error(
                "the checkpoint", mismatch, "this run uses", "use the same setting to resume"
            )
        saved = state_dict.get("recipe")
        if saved is not None and self.recipe and dict(saved) != self.recipe:
            raise recipe_error("the checkpoint", self.recipe, saved)

    # ---------------------------------------------------------------------------------------------- helpers
    def _evaluation_start(self, pl_module: pl.LightningModule) -> None:
        model = self._verify(pl_module)
        switch_states(model, _EVAL_GUARDED, FakeQuantState.VALIDATION)

    def _verify(self, pl_module: pl.LightningModule) -> nn.Module:
        model = get_submodule(pl_module, self.submodule)
        current = recipe_of(model)
        if self.recipe and current != self.recipe:
            raise recipe_error("the restored checkpoint", self.recipe, current)
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
        if rows:  # the ratios above count ops as this summary does (dtype_op_shares); add the FLOP shares
            scalars.update({f"quant/flop_share_{r.dtype}": r.flop_share for r in rows})
            summary = ", ".join(f"{r.dtype} {r.ops} ops / {r.flop_share:.1%} FLOPs" for r in rows if r.ops)
        rank_zero_info(
            f"PrepareQuantization: prepared `{self.submodule}` ({summary}); check report in {log_dir}"
        )
        log_scalars(trainer, scalars, step=0)
        report = log_dir / "model_check_result.txt"
        if trainer.is_global_zero and report.is_file():
            log_text(trainer, "quant/model_check", report.read_text(encoding="utf-8")[:100_000], step=0)
