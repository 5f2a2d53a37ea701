"""``QuantStatsMonitor``: per quant node scale and saturation (clipped fraction) during validation.

Like Lightning's ``LearningRateMonitor``: add it to the trainer and watch the curves in TensorBoard.
For every integer quant node it logs ``quant/scale/<node>`` (largest channel scale for weights) and
``quant/saturation/<node>``: the share of the node's input values that fall outside the quantization range
``[(qmin - 0.5) * scale, (qmax + 0.5) * scale]`` during the validation pass, summed over ranks. A node that
saturates a lot is a fixed-scale or int16 candidate (the seed's truncation error). Also the summary
``quant/saturation_max`` and the op dtype shares ``quant/ratio_<dtype>``.

``every_n_validations`` counts the validation passes of the fit (not Lightning's sanity check); the count is
saved in checkpoints, so a resumed fit logs at the same passes as an uninterrupted one.

``nodes`` patterns are checked against the network's integer quant nodes at the first hook that sees the
prepared network (``on_fit_start``, or ``on_validation_start`` of ``trainer.validate``): a pattern that
matches none warns (naming it and a few node names); when no pattern matches any, the monitor would watch
nothing, which is refused with a ``ValueError`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from qat_lightning.analysis.partial import match_name
from qat_lightning.callbacks._checks import (
    check_count,
    check_patterns,
    check_submodule,
    name_sample,
    unmatched_patterns,
)
from qat_lightning.callbacks._common import get_submodule
from qat_lightning.callbacks.logging import dtype_ratios, log_scalars
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize
from qat_lightning.quant.nodes.functional import _scale_view

__all__ = ["QuantStatsMonitor", "clipped_count"]


def clipped_count(node: FakeQuantize, x: Tensor) -> Tensor:
    """Count the values of ``x`` the node would clip with its current scale (a 0-d tensor, no sync)."""
    scale = _scale_view(node.scale, x, node.ch_axis)
    q = node.dtype
    return ((x > (q.qmax + 0.5) * scale) | (x < (q.qmin - 0.5) * scale)).sum()


class QuantStatsMonitor(Callback):
    r"""Log scale and saturation of every integer quant node after each validation pass.

    Args:
        nodes: quant-node name patterns to watch (glob or prefix, as ``FakeQuantSwitch``), one pattern as a
            str or a list of them; ``None``: all. Only integer (int8 / int16) nodes are watched: a pattern
            that matches none of them warns when the fit (or ``trainer.validate``) starts, and patterns that
            match none at all raise a ``ValueError`` there.
        every_n_validations: log every n-th validation pass of a fit, counting from the first (the count
            survives a resume); ``trainer.validate`` always logs and is not counted.
        submodule: attribute path of the network inside the LightningModule.

    Raises:
        TypeError: at construction for a non-int ``every_n_validations`` (``1.5``, ``True``), non-str
            patterns or submodule.
        ValueError: at construction for ``every_n_validations < 1`` or an empty ``nodes`` list; at fit (or
            validate) start when no pattern of ``nodes`` matches an integer quant node.
    """

    def __init__(
        self,
        nodes: Sequence[str] | None = None,
        every_n_validations: int = 1,
        submodule: str = "model",
    ) -> None:
        super().__init__()
        who = "QuantStatsMonitor"
        self.nodes = check_patterns("nodes", nodes, who)
        self.every_n_validations = check_count("every_n_validations", every_n_validations, who)
        self.submodule = check_submodule(submodule, who)
        self._checked_model: int | None = None  # id of the network whose node names were checked
        self.saturation: dict[str, float] = {}
        self._handles: list[Any] = []
        self._counts: dict[str, list[Tensor]] = {}
        self._passes = 0

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (one per watched set of nodes)."""
        return self._generate_state_key(nodes=self.nodes, submodule=self.submodule)

    def state_dict(self) -> dict[str, Any]:
        """Return how many validation passes of the fit were seen (the ``every_n_validations`` count)."""
        return {"passes": self._passes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pass count of the interrupted fit."""
        self._passes = int(state_dict.get("passes", 0))

    # ---------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the ``nodes`` patterns against the prepared network before the first validation."""
        self._check_nodes(get_submodule(pl_module, self.submodule))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach counting hooks to the watched nodes."""
        self._detach()
        self._check_nodes(get_submodule(pl_module, self.submodule))
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._passes += 1
            if (self._passes - 1) % self.every_n_validations:
                return
        for name, node in iter_fake_quantize(get_submodule(pl_module, self.submodule)):
            if node.dtype.is_integer and (self.nodes is None or any(match_name(p, name) for p in self.nodes)):
                self._counts[name] = [torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)]
                self._handles.append(node.register_forward_hook(self._hook(name)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reduce the counts over ranks and log scales and saturation."""
        if not self._handles:
            return
        self._detach()
        model = get_submodule(pl_module, self.submodule)
        names = list(self._counts)
        counts = torch.stack([torch.stack(self._counts[n]) for n in names]).to(trainer.strategy.root_device)
        counts = trainer.strategy.reduce(counts.double(), reduce_op="sum").cpu()
        self._counts = {}
        self.saturation = {
            n: float(c / t) if t > 0 else 0.0 for n, (c, t) in zip(names, counts.tolist(), strict=True)
        }
        nodes = dict(iter_fake_quantize(model))
        scalars = {f"quant/saturation/{n}": v for n, v in self.saturation.items()}
        scalars.update({f"quant/scale/{n}": float(nodes[n].scale.float().max()) for n in names})
        scalars.update({f"quant/ratio_{k}": v for k, v in dtype_ratios(model).items()})
        if self.saturation:
            scalars["quant/saturation_max"] = max(self.saturation.values())
        log_scalars(trainer, scalars)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Remove the hooks."""
        self._detach()
        self._counts = {}

    # ---------------------------------------------------------------------------------------------- helpers
    def _check_nodes(self, model: nn.Module) -> None:
        """Warn about patterns matching no integer quant node; refuse patterns that match none at all.

        Runs once per network (a later fit with another network checks again).
        """
        if self.nodes is None or self._checked_model == id(model):
            return
        names = [name for name, node in iter_fake_quantize(model) if node.dtype.is_integer]
        unmatched = unmatched_patterns(self.nodes, names, match_name)
        where = f"integer quant node of `{self.submodule}` (the monitor watches int8 / int16 nodes only)"
        if len(unmatched) == len(self.nodes):
            raise ValueError(
                f"QuantStatsMonitor: nodes={self.nodes!r} match no {where}, so it would watch nothing; its "
                f"integer quant nodes: {name_sample(names)}. Fix the patterns or pass nodes=None (all)"
            )
        if unmatched:
            rank_zero_warn(
                f"QuantStatsMonitor: pattern(s) {unmatched} match no {where} and are ignored; its integer "
                f"quant nodes: {name_sample(names)}"
            )
        self._checked_model = id(model)

    def _hook(self, name: str) -> Any:
        def hook(node: FakeQuantize, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0] if inputs else None
            active = node.state in (FakeQuantState.VALIDATION, FakeQuantState.QAT)
            if not isinstance(x, Tensor) or not active or not node.dtype.is_integer:
                return
            x = x.detach()
            slot = self._counts[name]
            slot[0] = slot[0].to(x.device) + clipped_count(node, x)
            slot[1] = slot[1].to(x.device) + x.numel()

        return hook

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
