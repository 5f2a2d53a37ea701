"""``FakeQuantSwitch``: partial quantization (the seed's last-resort locator) as a Lightning callback.

It turns fake quant (and optionally fake cast) off for ops matched by name, during the stages you choose,
and restores every node's own state after each batch (and at the end of each loop, for a batch whose end
hook Lightning skips). The plain-torch work (pattern matching,
``float_ops``, the bisection) is :mod:`qat_lightning.analysis.partial`; its names are re-exported here.
Patterns: :func:`~qat_lightning.quant.op_names.match_name`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from qat_lightning.analysis.partial import (
    BisectResult,
    bisect_float_blocks,
    bisect_model_blocks,
    block_patterns,
    float_ops,
    match_name,
    matched_nodes,
    restore_states,
    switch_to_float,
)
from qat_lightning.callbacks._checks import check_choices, check_patterns, check_submodule, require_bool
from qat_lightning.callbacks._common import get_submodule
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState

__all__ = [
    "STAGES",
    "FakeQuantSwitch",
    "BisectResult",
    "match_name",
    "matched_nodes",
    "float_ops",
    "block_patterns",
    "bisect_float_blocks",
    "bisect_model_blocks",
]

STAGES = ("fit", "validate", "test", "predict")


class FakeQuantSwitch(Callback):
    r"""Partial quantization: the matched ops run in float during the chosen stages.

    The switch is applied at each batch start and undone at each batch end (and on exceptions), so it
    composes with the other callbacks' state changes and never outlives a batch. Calibration is not affected
    (values pass through unchanged in CALIBRATION anyway): switching an op back on later finds it calibrated.

    Args:
        disable: op-name patterns to run in float (``["head.*"]``, ``["backbone.layer3"]``); a str is one.
        fake_cast: also turn off float16 fake cast of the matched ops (the seed's ``FakeCast.disable()``);
            ``False`` disables only integer fake quantization.
        stages: where it applies: ``"fit"`` (training and the validation inside fit), ``"validate"``,
            ``"test"``, ``"predict"``; one stage as a str or a list of them.
        submodule: attribute path of the network inside the LightningModule.

    Raises:
        ValueError: at construction for an empty ``disable``, no stage or an unknown stage.
        TypeError: at construction for ``disable`` that is not a str or a list of them, a non-bool
            ``fake_cast`` (``"no"``) or a non-str submodule.
    """

    def __init__(
        self,
        disable: Sequence[str] | str = ("head.*",),
        fake_cast: bool = True,
        stages: Sequence[str] | str = ("fit", "validate", "test"),
        submodule: str = "model",
    ) -> None:
        super().__init__()
        who = "FakeQuantSwitch"
        self.disable = check_patterns("disable", disable, who, allow_none=False)
        self.fake_cast = require_bool("fake_cast", fake_cast, who)
        self.stages = check_choices("stages", stages, STAGES, who)
        self.submodule = check_submodule(submodule, who)
        self.disabled_ops: list[str] = []
        self._nodes: list[FakeQuantize] | None = None
        self._model_id: int | None = None
        self._saved: list[tuple[FakeQuantize, FakeQuantState]] = []

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(submodule=self.submodule, disable=self.disable)

    # ---------------------------------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Switch the matched ops to float for this training batch."""
        self._apply(pl_module, "fit")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        """Switch the matched ops to float for this validation batch."""
        self._apply(pl_module, "fit" if trainer.state.fn == TrainerFn.FITTING else "validate")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Switch the matched ops to float for this test batch."""
        self._apply(pl_module, "test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Switch the matched ops to float for this prediction batch."""
        self._apply(pl_module, "predict")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the matched ops' states (``on_train_batch_start`` returning -1 skips the batch end)."""
        self._restore()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def state_dict(self) -> dict[str, Any]:
        """Plain config."""
        return {"disable": list(self.disable), "fake_cast": self.fake_cast, "stages": list(self.stages)}

    # ---------------------------------------------------------------------------------------------- helpers
    def _resolve(self, pl_module: pl.LightningModule) -> list[FakeQuantize]:
        model = get_submodule(pl_module, self.submodule)
        if self._nodes is None or self._model_id != id(model):
            names, nodes, unmatched = matched_nodes(model, self.disable, self.fake_cast)
            if unmatched:
                rank_zero_warn(f"FakeQuantSwitch: pattern(s) {unmatched} match no quantized op")
            self._nodes, self._model_id, self.disabled_ops = nodes, id(model), names
            rank_zero_info(
                f"FakeQuantSwitch: {len(names)} op(s) run in float during {self.stages}: {names[:10]}"
            )
        return self._nodes

    def _apply(self, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        if stage not in self.stages:
            return
        self._saved = switch_to_float(self._resolve(pl_module))

    def _restore(self) -> None:
        restore_states(self._saved)
        self._saved = []
