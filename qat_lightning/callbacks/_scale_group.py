"""The optimizer layout of learned (LSQ) QAT scales: one parameter group of their own, the same on resume.

``QuantizationAwareTraining`` creates the ``scale_param`` parameters in ``setup`` (before DDP wraps the
model, so their gradients are averaged across ranks), and a run resumed with ``ckpt_path`` reloads them
there too: either way ``configure_optimizers`` puts them into the model's own groups.
:func:`place_scale_group` (at ``on_fit_start``) moves them into a group of their own, the same layout in a
first run and on resume, so the checkpoint's optimizer state fits. Scales made later (at train start, e.g.
a model prepared after that ``setup``) are appended as a new group the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

__all__ = ["place_scale_group"]


def place_scale_group(optimizer: Optimizer, params: Sequence[nn.Parameter]) -> bool:
    """Put ``params`` (the learned scales) in one parameter group of their own, in ``params`` order.

    A group that holds exactly these parameters is kept (its hyper-parameters too), in ``params`` order.
    Otherwise they are taken out of every group (a group left empty by that is dropped: the first run never
    had it) and appended as a new group with the optimizer's defaults, as the first run did. Parameters the
    optimizer already has state for keep it (the state is keyed by parameter, not by group).

    Args:
        optimizer: the optimizer training the model (Lightning's first optimizer).
        params: the learned ``scale_param`` parameters, in the order the first run added them.

    Returns:
        Whether the optimizer's groups changed.
    """
    if not params:
        return False
    order = [id(p) for p in params]
    wanted = set(order)
    for group in optimizer.param_groups:
        if {id(p) for p in group["params"]} == wanted and len(group["params"]) == len(order):
            if [id(p) for p in group["params"]] == order:
                return False
            group["params"] = list(params)
            return True
    kept = []
    for group in optimizer.param_groups:
        rest = [p for p in group["params"] if id(p) not in wanted]
        if rest or len(rest) == len(group["params"]):  # drop only a group our removal emptied
            group["params"] = rest
            kept.append(group)
    optimizer.param_groups[:] = kept
    optimizer.add_param_group({"params": list(params)})
    return True
