"""Post-training algorithms as callbacks: ``Equalization``, ``BiasCorrection``, ``AdaRound``.

``Equalization`` runs before prepare, ``BiasCorrection`` and ``AdaRound`` after calibration.

Order in ``Trainer(callbacks=[...])`` is the order of their work::

    Trainer(callbacks=[
        Equalization(),            # setup(): on the float network, before PrepareQuantization's setup
        PrepareQuantization(setter),
        Calibration(num_batches=50),
        AdaRound(),                # on_fit_start, after Calibration's (same hook, later in the list)
        BiasCorrection(),
    ], max_epochs=0)

``AdaRound`` / ``BiasCorrection`` run once: a resumed run (the callback's state says it ran) keeps the
weights of its checkpoint. ``Equalization`` runs in every ``setup()`` on the fresh float network; a checkpoint
restored afterwards brings the weights it saved. Under DDP the algorithms run on every rank's shard and
rank zero's result is broadcast.

``AdaRound`` / ``BiasCorrection`` overwrite float parameters (rounded weights, corrected biases) and record
the original values on the network (:mod:`qat_lightning.ptq.float_record`); the analysis tools read the
float model from them (:func:`qat_lightning.ptq.float_reference`). The record is not in the ``state_dict``:
these callbacks save it under ``checkpoint["qat_lightning_ptq"][submodule]`` and attach it again when a
checkpoint is restored (the app's ``load_quantized`` does the same for a calibration checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from qat_lightning.callbacks._checks import (
    check_callable,
    check_choices,
    check_count,
    check_dataloader,
    check_number_list,
    check_submodule,
)
from qat_lightning.callbacks._common import (
    InputFn,
    batch_transfer,
    broadcast_module_state,
    get_submodule,
    is_calibrated,
    is_prepared,
    request_dataloader,
    require_prepared,
)
from qat_lightning.ptq import (
    DEFAULT_ALPHAS,
    EQUALIZE_KINDS,
    PTQ_CHECKPOINT_KEY,
    AdaRoundConfig,
    adaround,
    bias_correction,
    equalize,
    float_record_state,
    load_float_record_state,
)

__all__ = ["AdaRound", "BiasCorrection", "Equalization"]


def _batches(trainer: pl.Trainer, pl_module: pl.LightningModule, which: str | Iterable[Any]) -> Iterable[Any]:
    loader = request_dataloader(trainer, pl_module, which)
    transfer = batch_transfer(trainer)
    return (transfer(b) for b in loader)


def _broadcast(trainer: pl.Trainer, model: nn.Module) -> None:
    """Give every rank rank zero's parameters, buffers and float records (no-op on one process)."""
    if trainer.world_size <= 1 or not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return
    records = float_record_state(model)  # read before the broadcast moves the parameters they describe
    for p in model.parameters():
        torch.distributed.broadcast(p.data, src=0)
    broadcast_module_state(trainer, model)
    for key in sorted(records):  # the same ops on every rank; in place: the records' own tensors
        torch.distributed.broadcast(records[key]["original"], src=0)
        torch.distributed.broadcast(records[key]["written"], src=0)


def _check_common(
    who: str, num_batches: Any, dataloader: Any, input_fn: Any, submodule: Any
) -> tuple[int | None, Any, InputFn | None, str]:
    """Check the arguments every post-training callback takes; return them (``num_batches`` as an int).

    Raises:
        TypeError: a non-int ``num_batches`` (``1.5``, ``True``), a dataloader that is neither a name nor an
            iterable, a non-callable ``input_fn``, a non-str ``submodule``.
        ValueError: ``num_batches < 1``, an unknown dataloader name.
    """
    return (
        check_count("num_batches", num_batches, who, allow_none=True),
        check_dataloader(dataloader, who),
        check_callable("input_fn", input_fn, who),
        check_submodule(submodule, who),
    )


class Equalization(Callback):
    """Equalize the float network in ``setup()`` (cross-layer + SmoothQuant LN / matmul, alpha searched).

    Put it before ``PrepareQuantization`` in the callback list; on an already prepared network it raises.

    Args:
        num_batches: calibration batches for activation ranges and the alpha search.
        dataloader: ``"train"`` (default), ``"val"``, ``"test"`` or any iterable of batches.
        input_fn: batch -> model inputs.
        submodule: attribute path of the network inside the LightningModule.
        kinds: groups to equalize (``cross_layer``, ``layernorm``, ``matmul``); one as a str or a list.
        alphas: SmoothQuant alphas tried per group (numbers in ``[0, 1]``).
        cle_rounds: cross-layer passes (an int >= 1).

    Raises:
        TypeError: at construction for a non-int count (``1.5``, ``True``), non-number alphas, a dataloader
            that is neither a name nor an iterable, a non-callable ``input_fn`` or a non-str submodule.
        ValueError: at construction for a count below 1, an unknown dataloader name, no kind or an unknown
            kind, no alpha or one outside ``[0, 1]``.
    """

    def __init__(
        self,
        num_batches: int | None = 4,
        dataloader: str | Iterable[Any] = "train",
        input_fn: InputFn | None = None,
        submodule: str = "model",
        kinds: Sequence[str] = EQUALIZE_KINDS,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        cle_rounds: int = 3,
    ) -> None:
        super().__init__()
        who = "Equalization"
        self.num_batches, self.dataloader, self.input_fn, self.submodule = _check_common(
            who, num_batches, dataloader, input_fn, submodule
        )
        self.kinds = check_choices("kinds", kinds, EQUALIZE_KINDS, who)
        what = "numbers in [0, 1] (one or more SmoothQuant alphas)"
        self.alphas = check_number_list("alphas", alphas, who, what=what, low=0.0, high=1.0, include_low=True)
        self.cle_rounds = check_count("cle_rounds", cle_rounds, who)
        self.result: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Equalize the float network (once per setup; Lightning restores a checkpoint after this)."""
        model = get_submodule(pl_module, self.submodule)
        if is_prepared(model):
            raise ValueError(
                f"Equalization: pl_module.{self.submodule} is already prepared; equalization changes the "
                "float network, so put Equalization before PrepareQuantization in the callback list"
            )
        batches = _batches(trainer, pl_module, self.dataloader)
        self.result = equalize(
            model,
            batches,
            num_batches=self.num_batches,
            input_fn=self.input_fn,
            kinds=self.kinds,
            alphas=self.alphas,
            cle_rounds=self.cle_rounds,
        )
        _broadcast(trainer, model)
        rank_zero_info(f"Equalization: {self.result.applied} of {len(self.result.groups)} group(s) applied")


class _AfterCalibration(Callback):
    """Runs ``self._apply(model, batches)`` once, on a calibrated network, at fit/validate/test start."""

    who = ""

    def __init__(
        self,
        num_batches: int | None,
        dataloader: str | Iterable[Any],
        input_fn: InputFn | None,
        submodule: str,
    ) -> None:
        super().__init__()
        self.num_batches, self.dataloader, self.input_fn, self.submodule = _check_common(
            self.who, num_batches, dataloader, input_fn, submodule
        )
        self.applied = False
        self.result: Any = None

    @property
    def state_key(self) -> str:
        """One state per submodule."""
        return self._generate_state_key(submodule=self.submodule)

    def state_dict(self) -> dict[str, Any]:
        """Whether it ran (a resumed run does not run it again: the checkpoint holds its weights)."""
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore whether it ran."""
        self.applied = bool(state_dict.get("applied", False))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Save the network's float records (the values the post-training steps overwrote)."""
        model = get_submodule(pl_module, self.submodule)
        records = float_record_state(model) if is_prepared(model) else {}
        if records:
            checkpoint.setdefault(PTQ_CHECKPOINT_KEY, {})[self.submodule] = records

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Attach the float records of a restored checkpoint to the network."""
        records = (checkpoint.get(PTQ_CHECKPOINT_KEY) or {}).get(self.submodule)
        model = get_submodule(pl_module, self.submodule)
        if records and is_prepared(model):
            load_float_record_state(model, records)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run after Calibration (put this callback after it)."""
        self._run(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run at the start of ``trainer.validate``."""
        if trainer.state.fn != TrainerFn.FITTING:
            self._run(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run at the start of ``trainer.test``."""
        self._run(trainer, pl_module)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied:
            return
        model = get_submodule(pl_module, self.submodule)
        require_prepared(model, self.who, self.submodule)
        if not is_calibrated(model):
            raise ValueError(
                f"{self.who}: pl_module.{self.submodule} is not calibrated; "
                f"put Calibration before {self.who} in the callback list"
            )
        self.result = self._apply(model, _batches(trainer, pl_module, self.dataloader))
        _broadcast(trainer, model)
        self.applied = True
        rank_zero_info(f"{self.who}: {len(self.result.rows)} op(s), {len(self.result.skipped)} skipped")

    def _apply(self, model: nn.Module, batches: Iterable[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class BiasCorrection(_AfterCalibration):
    """Empirical bias correction of every conv / linear op after calibration (``ql.ptq.bias_correction``).

    Args:
        num_batches: calibration batches (``None``: the whole loader).
        dataloader: ``"train"`` (default), ``"val"``, ``"test"`` or any iterable of batches.
        input_fn: batch -> model inputs.
        submodule: attribute path of the network inside the LightningModule.

    Raises:
        TypeError: at construction for a non-int ``num_batches``, a dataloader that is neither a name nor an
            iterable, a non-callable ``input_fn`` or a non-str submodule.
        ValueError: at construction for ``num_batches < 1`` or an unknown dataloader name.
    """

    who = "BiasCorrection"

    def __init__(
        self,
        num_batches: int | None = 16,
        dataloader: str | Iterable[Any] = "train",
        input_fn: InputFn | None = None,
        submodule: str = "model",
    ) -> None:
        super().__init__(num_batches, dataloader, input_fn, submodule)

    def _apply(self, model: nn.Module, batches: Iterable[Any]) -> Any:
        return bias_correction(model, batches, num_batches=self.num_batches, input_fn=self.input_fn)


class AdaRound(_AfterCalibration):
    """AdaRound of every conv / linear weight after calibration (``ql.ptq.adaround``), frozen into the weight.

    Args:
        num_batches: calibration batches (``None``: the whole loader).
        dataloader: ``"train"`` (default), ``"val"``, ``"test"`` or any iterable of batches.
        input_fn: batch -> model inputs.
        submodule: attribute path of the network inside the LightningModule.
        iterations: Adam steps per op.
        reg_weight: weight of the rounding regulariser.
        lr: Adam learning rate.
        batch_size: rows per step.
        max_samples: rows kept per op.

    Raises:
        TypeError: at construction, as :class:`BiasCorrection`, and for a non-int count or a non-number
            ``reg_weight`` / ``lr`` (checked by :class:`~qat_lightning.ptq.AdaRoundConfig`).
        ValueError: at construction, as :class:`BiasCorrection`, and for a count below 1 or a non-finite /
            non-positive ``lr``.
    """

    who = "AdaRound"

    def __init__(
        self,
        num_batches: int | None = 16,
        dataloader: str | Iterable[Any] = "train",
        input_fn: InputFn | None = None,
        submodule: str = "model",
        iterations: int = 500,
        reg_weight: float = 0.01,
        lr: float = 1e-2,
        batch_size: int = 256,
        max_samples: int = 4096,
    ) -> None:
        super().__init__(num_batches, dataloader, input_fn, submodule)
        self.config = AdaRoundConfig(
            iterations=iterations,
            reg_weight=reg_weight,
            lr=lr,
            batch_size=batch_size,
            max_samples=max_samples,
        )

    def _apply(self, model: nn.Module, batches: Iterable[Any]) -> Any:
        return adaround(
            model, batches, num_batches=self.num_batches, input_fn=self.input_fn, config=self.config
        )
