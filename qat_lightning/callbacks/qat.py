"""``QuantizationAwareTraining``: QAT state while training, frozen scales while evaluating, no LR warmup.

The seed's QAT advice made checks: no warmup (``find_lr_warmup`` inspects the schedulers), QAT steps no
more than 20% of the float training's, and the "fixing or updating input/output scales" experiment as the
``fix_scales`` option.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from qat_lightning.callbacks import _qat_scales as scales_of
from qat_lightning.callbacks._checks import check_count, check_submodule, require_bool
from qat_lightning.callbacks._common import (
    broadcast_module_state,
    get_submodule,
    require_prepared,
    switch_states,
)
from qat_lightning.callbacks._scale_group import drop_params, place_learned_scales
from qat_lightning.callbacks.logging import log_scalars
from qat_lightning.quant.calibrate import require_calibrated
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState
from qat_lightning.quant.nodes.frozen import frozen_parameters
from qat_lightning.quant.qat import activation_nodes, find_lr_warmup, freeze_batchnorm, io_quant_nodes

__all__ = [
    "BN_MODES",
    "FIX_SCALES",
    "FIX_TO_SCALES",
    "QAT_SCALES",
    "QAT_STEP_SHARE",
    "QuantizationAwareTraining",
    "find_lr_warmup",
    "io_quant_nodes",
]

BN_MODES = ("fuse_bn", "with_bn", "freeze_bn")
FIX_SCALES = (None, "input_output", "all")
QAT_SCALES = ("moving", "fixed_input_output", "fixed", "learned")
"""``scales=``: activation scales follow the data (default: the seed fixes scales only when calibration
accuracy is already good) / pinned on the model's input and output ops / all pinned / learned (LSQ).
The old ``fix_scales`` names map onto it: None -> moving, input_output -> fixed_input_output, all -> fixed."""
FIX_TO_SCALES: dict[str | None, str] = {None: "moving", "input_output": "fixed_input_output", "all": "fixed"}
"""The old ``fix_scales`` names as :data:`QAT_SCALES` modes."""
QAT_STEP_SHARE = 0.2
"""The seed: QAT training steps should not exceed 20% of the floating-point training steps."""


def _schedulers(trainer: pl.Trainer) -> Iterator[Any]:
    for config in trainer.lr_scheduler_configs:
        yield config.scheduler


# ----------------------------------------------------------------------------------------------- callback
class QuantizationAwareTraining(Callback):
    r"""QAT state while training; VALIDATION (frozen scales, no observer update) in val / test / predict.

    At ``on_fit_start`` it puts the network in train mode: a model reloaded for QAT (e.g. by
    ``load_quantized_checkpoint``, which returns it in eval mode) would otherwise train in eval mode under
    Lightning 2.x, with BatchNorm frozen whatever ``bn_mode`` says. Other children of the LightningModule (a
    teacher, a frozen loss network) keep their modes. At ``on_train_start`` (after any checkpoint restore and
    the optimizer creation) it:

    * refuses an uncalibrated model with one clear error (``strict=False``: one warning instead);
    * refuses LR warmup (``check_lr``): the seed says QAT must align the decay with the float run but use no
      warmup; the error names the scheduler and why;
    * warns when the planned QAT steps exceed 20% of ``float_steps``;
    * applies ``scales`` to every activation node, whatever mode an earlier fit left it in:
      ``"fixed_input_output"`` pins the output scales of the model's input ops and of its last ops (the
      others move), ``"fixed"`` pins every activation scale (weight scales keep following the weights),
      ``"moving"`` pins none; nodes with a fixed-scale observer (qconfig) stay pinned, and so do nodes
      pinned by hand (``set_qat_scales``) or by an earlier fit (a warning names them). The pinned
      flag is a buffer, so it survives checkpoints. The count is logged (``qat/fixed_scales``, or
      ``qat/learned_scales``) as the nodes are after that;
    * with ``bn_mode="freeze_bn"``, keeps every BatchNorm in eval mode while training (frozen running
      statistics, the seed's "freeze BN trick"), re-applied after each validation.

    Args:
        bn_mode: ``None`` (as prepared), ``"fuse_bn"``, ``"with_bn"`` or ``"freeze_bn"``. ``fuse_bn`` and
            ``with_bn`` are structural (chosen at prepare time) and must equal the prepared model's
            ``qat_mode`` (a model prepared with ``freeze_bn`` accepts neither); ``freeze_bn`` (and ``None``)
            fit a model prepared in any mode.
        fix_scales: ``None``, ``"input_output"`` or ``"all"`` (old name; use ``scales``).
        scales: QAT scale mode, one of :data:`QAT_SCALES` (default ``"moving"``); ``"learned"`` creates the
            LSQ scale parameters in ``setup`` (before DDP wraps the model, which then averages their
            gradients like any other's; a checkpoint restored with ``ckpt_path`` reloads their values) and
            at ``on_fit_start`` takes them out of the groups ``configure_optimizers`` put them in: they get
            a parameter group of their own (the first optimizer's last, with its defaults), the same in a
            first run and on resume, so the optimizer state fits (hyper-parameters included). With several
            optimizers a scale that ``configure_optimizers`` put in another one than the first stays there
            (the user's choice); every scale ends in exactly one optimizer. A node left learned by an
            earlier fit keeps its trained scale; the other modes put learned nodes back to moving in
            ``setup`` (before the optimizers exist), from their trained scales.
        check_lr: refuse warmup schedulers.
        float_steps: optimizer steps of the float training (``None``: not checked).
        submodule: attribute path of the network inside the LightningModule.
        strict: refuse to train a model that was never calibrated (``False``: warn once and start from
            uncalibrated scales).

    Raises:
        TypeError: at construction for a non-bool flag, a non-int ``float_steps`` or a non-str submodule.
        ValueError: at construction for an unknown option; at train start for a warmup scheduler or a bn_mode
            the prepared model cannot honour; when a fit resumes a checkpoint of other QAT settings
            (``validate`` / ``test`` / ``predict`` load it as saved: they train nothing).
        UncalibratedModelError: at train start for an uncalibrated model (unless ``strict=False``).
    """

    def __init__(
        self,
        bn_mode: str | None = None,
        fix_scales: str | None = None,
        check_lr: bool = True,
        scales: str | None = None,
        float_steps: int | None = None,
        submodule: str = "model",
        strict: bool = True,
    ) -> None:
        super().__init__()
        if bn_mode is not None and bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode={bn_mode!r} is not supported; allowed: None, {', '.join(BN_MODES)}")
        if fix_scales not in FIX_SCALES:
            raise ValueError(
                f"fix_scales={fix_scales!r} is not supported; allowed: None, 'input_output', 'all'"
            )
        self.bn_mode = bn_mode
        if scales is not None and scales not in QAT_SCALES:
            raise ValueError(f"scales={scales!r} is not supported; allowed: {', '.join(QAT_SCALES)}")
        if scales is not None and fix_scales is not None and FIX_TO_SCALES[fix_scales] != scales:
            raise ValueError(f"fix_scales={fix_scales!r} contradicts scales={scales!r}; give only scales")
        self.scales = scales if scales is not None else FIX_TO_SCALES[fix_scales]
        self.fix_scales = {v: k for k, v in FIX_TO_SCALES.items()}.get(self.scales)
        who = "QuantizationAwareTraining"
        self.check_lr = require_bool("check_lr", check_lr, who)
        self.float_steps = check_count("float_steps", float_steps, who, allow_none=True)
        self.submodule = check_submodule(submodule, who)
        self.strict = require_bool("strict", strict, who)
        self._bn_saved: list[tuple[nn.Module, bool]] = []
        self._frozen = ExitStack()  # frozen_parameters around an evaluation loop (folds reused there)
        self._load_hooks: list[RemovableHandle] = []  # learned scales made in setup, until train start
        self._stage: str | None = None  # the running trainer function (from setup)

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (one per submodule)."""
        return self._generate_state_key(submodule=self.submodule)

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fitting: make the learned scales before DDP wraps the model, or release the ones a fit left.

        DDP only averages the gradients of the parameters that exist when it wraps the model: made later,
        each rank would train its own scales. They start from the current scale (calibration, which runs
        later, updates them in place). A checkpoint restored without them (another scale mode) drops them
        again, so it loads as saved and ``load_state_dict`` can name the mismatch. The other modes put
        nodes an earlier fit learned back to moving here, before ``configure_optimizers``.
        """
        self._stage = stage
        if stage != TrainerFn.FITTING:
            return
        self._drop_load_hooks()
        model = self._model(pl_module)
        if self.scales == "learned":
            self._load_hooks = scales_of.make_learned(model)
            return
        released = scales_of.release_scales(model)
        if released:
            rank_zero_info(
                f"QuantizationAwareTraining(scales={self.scales!r}): {len(released)} scale(s) left learned "
                f"by an earlier fit start moving from their trained values: {', '.join(released)}"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the load hooks of ``setup`` (a fit that never started training)."""
        self._drop_load_hooks()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that the network is prepared and the requested BN mode fits it; put it in train mode."""
        model = self._model(pl_module)
        require_prepared(model, "QuantizationAwareTraining", self.submodule)
        self._check_bn_mode(model)
        self._train_mode(pl_module, model)
        self._place_learned(trainer, model)  # resumed: scale_params reloaded, before the optimizer state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Under a strategy restoring the model after the optimizers exist, regroup the reloaded scales."""
        if trainer.state.fn == TrainerFn.FITTING and trainer.strategy.restore_checkpoint_after_setup:
            self._place_learned(trainer, self._model(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the LR schedule and step budget, fix scales, enter QAT state."""
        self._drop_load_hooks()  # every checkpoint is restored by now
        model = self._model(pl_module)
        require_calibrated(model, "QuantizationAwareTraining", strict=self.strict)
        if self.check_lr:
            self._refuse_warmup(trainer)
        self._check_steps(trainer)
        count = self._apply_scales(model, trainer)  # as the nodes are now: a fixed-threshold node stays
        if count:
            kind = "learned" if self.scales == "learned" else "pinned"
            rank_zero_info(f"QuantizationAwareTraining(scales={self.scales!r}): {count} scale(s) {kind}")
        switch_states(model, (FakeQuantState.VALIDATION, FakeQuantState.CALIBRATION), FakeQuantState.QAT)
        self._freeze_bn(model)
        tag = "qat/learned_scales" if self.scales == "learned" else "qat/fixed_scales"
        log_scalars(trainer, {tag: float(count)})  # each mode's count under its own name

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-apply the frozen BN mode (Lightning puts the module in train mode each epoch)."""
        self._freeze_bn(self._model(pl_module))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze scales for validation (also during the sanity check); reuse BN folds until its end."""
        switch_states(self._model(pl_module), (FakeQuantState.QAT,), FakeQuantState.VALIDATION)
        self._freeze_parameters(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Go back to QAT when the validation ran inside training."""
        self._frozen.close()
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            model = self._model(pl_module)
            switch_states(model, (FakeQuantState.VALIDATION,), FakeQuantState.QAT)
            self._freeze_bn(model)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze scales for testing; reuse BN folds until its end."""
        switch_states(self._model(pl_module), (FakeQuantState.QAT,), FakeQuantState.VALIDATION)
        self._freeze_parameters(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop reusing BN folds."""
        self._frozen.close()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze scales for prediction; reuse BN folds until its end."""
        switch_states(self._model(pl_module), (FakeQuantState.QAT,), FakeQuantState.VALIDATION)
        self._freeze_parameters(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop reusing BN folds."""
        self._frozen.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the model evaluation-ready: VALIDATION state, BN modes restored, ranks identical."""
        model = self._model(pl_module)
        switch_states(model, (FakeQuantState.QAT,), FakeQuantState.VALIDATION)
        self._restore_bn()
        broadcast_module_state(trainer, model)  # ranks end identical (the last step updated scales locally)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Restore BN modes, stop reusing BN folds and leave no node in QAT state."""
        self._frozen.close()
        self._drop_load_hooks()
        self._restore_bn()
        model = get_submodule(pl_module, self.submodule)
        switch_states(model, (FakeQuantState.QAT,), FakeQuantState.VALIDATION)

    def state_dict(self) -> dict[str, Any]:
        """Plain config: the QAT recipe (bn_mode, fix_scales)."""
        return {
            "bn_mode": self.bn_mode,
            "fix_scales": self.fix_scales,
            "scales": self.scales,
            "float_steps": self.float_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a QAT run made with other scale fixing or BN mode (fitting only).

        ``trainer.validate`` / ``test`` / ``predict`` with ``ckpt_path`` train nothing: the checkpoint's
        model loads as saved, whatever QAT settings it was trained with.
        """
        if self._stage not in (None, TrainerFn.FITTING):
            return
        for key in ("bn_mode", "fix_scales", "scales"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint was trained with QuantizationAwareTraining({key}={state_dict[key]!r}) "
                    f"but this run uses {key}={getattr(self, key)!r}; resuming would not reproduce the run. "
                    "Use the same setting, or start a new QAT run from the weights (not ckpt_path)"
                )

    # ---------------------------------------------------------------------------------------------- helpers
    def _freeze_parameters(self, pl_module: pl.LightningModule) -> None:
        """Enter ``frozen_parameters`` for an evaluation loop (its parameters do not change there)."""
        self._frozen.close()
        self._frozen.enter_context(frozen_parameters(self._model(pl_module)))

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return get_submodule(pl_module, self.submodule)

    def _refuse_warmup(self, trainer: pl.Trainer) -> None:
        for scheduler in _schedulers(trainer):
            reason = find_lr_warmup(scheduler)
            if reason is not None:
                raise ValueError(
                    f"QAT refuses learning-rate warmup: {reason}. The seed (QAT, 1b): 'Align the learning "
                    "rate decay strategy with the floating-point model's but ensure no warmup strategies are "
                    "used' - a warmup starts QAT from a tiny LR and then jumps away from the calibrated "
                    "solution. Use the float run's decay (e.g. CosineAnnealingLR) without warmup, or pass "
                    "check_lr=False."
                )

    def _check_steps(self, trainer: pl.Trainer) -> None:
        if self.float_steps is None:
            return
        steps = trainer.estimated_stepping_batches
        if math.isfinite(steps) and steps > QAT_STEP_SHARE * self.float_steps:
            rank_zero_warn(
                f"QAT is planned for {int(steps)} optimizer steps, {steps / self.float_steps:.0%} of the "
                f"float training's {self.float_steps}; the seed recommends at most {QAT_STEP_SHARE:.0%}. "
                "Watch the training loss and the evaluation results and stop earlier if they are flat"
            )

    def _apply_scales(self, model: nn.Module, trainer: pl.Trainer) -> int:
        """Apply ``scales`` to every activation node; return the count as logged (learned or pinned)."""
        released, late = scales_of.apply_scales(model, self.scales)
        drop_params(trainer.optimizers, released)  # made learned after setup: no optimizer keeps them
        if late and trainer.world_size > 1:
            rank_zero_warn(
                f"QuantizationAwareTraining(scales='learned'): {len(late)} learned scale(s) were created "
                "at train start, after DDP wrapped the model (prepared or reloaded after this callback's "
                "setup): DDP does not average their gradients and each rank trains its own. List "
                "QuantizationAwareTraining after PrepareQuantization"
            )
        self._place_learned(trainer, model)  # their own group (late ones: the optimizer lacks them)
        if (kept := scales_of.kept_pins_message(model, self.scales)) is not None:
            rank_zero_warn(kept)  # hand pins (or an earlier fit's) stay: releasing would undo them silently
        return scales_of.count_scales(model, self.scales)

    def _place_learned(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Give each learned scale one optimizer: the first's scale group unless the user chose another."""
        if self.scales != "learned":
            return
        params = [n.scale_param for _, n in activation_nodes(model) if n.scale_mode == "learned"]
        optimizers: list[Optimizer] = list(trainer.optimizers)
        if params and not optimizers:
            rank_zero_warn("QuantizationAwareTraining(scales='learned'): no optimizer trains the scales")
        elif params:
            place_learned_scales(optimizers, params)

    def _drop_load_hooks(self) -> None:
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks = []

    def _check_bn_mode(self, model: nn.Module) -> None:
        """Refuse a structural ``bn_mode`` other than the one the model was prepared with.

        ``None`` and ``"freeze_bn"`` fit every prepared mode (freezing puts the BatchNorms in eval mode);
        ``"fuse_bn"`` / ``"with_bn"`` must equal the prepared ``qat_mode``: a ``freeze_bn`` preparation
        keeps its BatchNorms frozen whatever the callback asks.
        """
        record = getattr(model, "prepare_record", None)
        prepared_mode = getattr(record, "qat_mode", None)
        if self.bn_mode in (None, "freeze_bn") or prepared_mode is None or self.bn_mode == prepared_mode:
            return
        raise ValueError(
            f"bn_mode={self.bn_mode!r} needs a model prepared with qat_mode={self.bn_mode!r}, but it was "
            f"prepared with qat_mode={prepared_mode!r}; set PrepareQuantization(qat_mode={self.bn_mode!r}) "
            "instead (the BN handling is chosen at prepare time), or use bn_mode='freeze_bn' / None"
        )

    def _train_mode(self, pl_module: pl.LightningModule, model: nn.Module) -> None:
        evaluating = sum(1 for m in model.modules() if not m.training)
        if evaluating:
            rank_zero_info(
                f"QuantizationAwareTraining: {evaluating} module(s) of `{self.submodule}` were in eval mode "
                "(e.g. a reloaded checkpoint); QAT trains them in train mode, BatchNorm as bn_mode says"
            )
        model.train()
        pl_module.training = True  # the LightningModule itself; its other children keep their modes

    def _freeze_bn(self, model: nn.Module) -> None:
        if self.bn_mode != "freeze_bn":
            return
        known = {id(m) for m, _ in self._bn_saved}
        self._bn_saved += [(m, was) for m, was in freeze_batchnorm(model) if id(m) not in known]

    def _restore_bn(self) -> None:
        for module, training in self._bn_saved:
            module.train(training)
        self._bn_saved = []
