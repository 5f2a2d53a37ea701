"""``eval_restoring``: eval mode for an export or a check, with everything put back exactly afterwards.

``model.train(was_training)`` is not a restore: it sets *every* submodule's flag, so a BatchNorm frozen with
``freeze_batchnorm`` (eval inside a training model) would come back in train mode and the next QAT step would
move its frozen running statistics. Here each submodule's own flag is saved and written back, and so are the
process-wide switches (``GlobalFakeQuantSwitch``, ``FakeCast``) that a ``forward`` may flip: a forward that
raises between ``disable()`` and ``enable()`` does not leave them off. (``qat_lightning.analysis.state``
has the same flag restore as ``eval_mode``; ``quant/`` does not import ``analysis/``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

__all__ = ["eval_restoring"]


@contextmanager
def eval_restoring(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` (every submodule) in eval mode; restore each module's flag and the switches on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    switches = (GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled)
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training
        GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled = switches
