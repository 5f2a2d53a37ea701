"""The optimizer layout of learned (LSQ) QAT scales: one parameter group of their own, the same on resume.

``QuantizationAwareTraining`` creates the ``scale_param`` parameters in ``setup`` (before DDP wraps the
model, so their gradients are averaged across ranks), and a run resumed with ``ckpt_path`` reloads them
there too: either way ``configure_optimizers`` puts them into the model's own groups.
:func:`place_scale_group` (at ``on_fit_start``) moves them into a group of their own, the same layout in a
first run and on resume, so the checkpoint's optimizer state fits. Scales made later (at train start, e.g.
a model prepared after that ``setup``) are appended as a new group the same way.

With several optimizers, :func:`place_learned_scales` makes each scale held by exactly one: a scale that
``configure_optimizers`` put in an optimizer other than the first stays there (the user chose it; the first
such optimizer keeps it), every other scale goes to the first optimizer's scale group, and each is taken
out of every other optimizer (else it would be stepped once per optimizer).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

__all__ = ["drop_params", "place_learned_scales", "place_scale_group"]


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


def place_learned_scales(optimizers: Sequence[Optimizer], params: Sequence[nn.Parameter]) -> bool:
    """Give every learned scale exactly one optimizer (see the module docstring).

    A scale held by an optimizer other than the first stays in the first such optimizer's groups where
    ``configure_optimizers`` put it; the others get the first optimizer's scale group
    (:func:`place_scale_group`). Each is removed from every other optimizer (with its state there).

    Args:
        optimizers: the trainer's optimizers, in ``configure_optimizers`` order.
        params: the learned ``scale_param`` parameters, in the order the first run added them.

    Returns:
        Whether any optimizer's groups changed.
    """
    if not optimizers or not params:
        return False
    owners = _user_owners(optimizers, params)
    changed = False
    for index, optimizer in enumerate(optimizers):
        others = [p for p in params if owners.get(id(p), 0) != index]
        changed |= drop_params([optimizer], others)
    own = [p for p in params if id(p) not in owners]
    return place_scale_group(optimizers[0], own) or changed


def _user_owners(optimizers: Sequence[Optimizer], params: Sequence[nn.Parameter]) -> dict[int, int]:
    """Map ``id(param)`` to the first optimizer after the first one that holds it (the user's choice)."""
    wanted = {id(p) for p in params}
    owners: dict[int, int] = {}
    for index, optimizer in enumerate(optimizers[1:], start=1):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in wanted:
                    owners.setdefault(id(p), index)
    return owners


def drop_params(optimizers: Sequence[Optimizer], params: Sequence[nn.Parameter]) -> bool:
    """Take ``params`` out of every group of ``optimizers`` (and out of their state).

    A group left empty by the removal is dropped (a group that was empty before is kept).

    Args:
        optimizers: the optimizers to clean.
        params: the parameters none of them may hold any more.

    Returns:
        Whether any optimizer's groups changed.
    """
    unwanted = {id(p) for p in params}
    changed = False
    for optimizer in optimizers:
        kept = []
        for group in optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in unwanted]
            changed |= len(rest) != len(group["params"])
            if rest or not group["params"]:
                group["params"] = rest
                kept.append(group)
        optimizer.param_groups[:] = kept
        for p in [p for p in optimizer.state if id(p) in unwanted]:
            del optimizer.state[p]
    return changed
