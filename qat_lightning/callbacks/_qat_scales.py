"""How ``QuantizationAwareTraining`` applies its ``scales`` mode to the activation nodes it governs.

The callback governs every per-tensor integer (activation) node of its network. Nodes whose observer is
``"fixed"`` (a ``fixed_scale`` / ``threshold`` in their qconfig) are pinned by design and stay pinned in every
mode (``set_qat_scales`` skips them).

* ``setup`` (fitting, before ``configure_optimizers``): ``learned`` makes the scale parameters
  (:func:`make_learned`); every other mode puts the nodes an earlier fit left learned back to ``moving``
  (:func:`release_scales`), so no stale ``scale_param`` reaches the optimizer.
* ``on_train_start`` (after calibration and any checkpoint restore): :func:`apply_scales` sets the mode
  (``fixed`` pins all, ``fixed_input_output`` pins the input/output nodes, ``learned`` learns all).
* A pinned node that the mode does not pin itself (pinned by hand with ``set_qat_scales(model, "fixed",
  nodes)``, the way to pin chosen nodes, or by an earlier fit with ``scales="fixed"``) stays pinned under
  ``moving`` and ``fixed_input_output``: the callback cannot tell a hand pin from an earlier fit's, and
  releasing a hand pin would silently undo it. :func:`kept_pins_message` names those nodes (the callback
  warns), and the logged count includes them.

Every mode change starts from the node's current scale: a learned scale is first synced from its parameter
(the last optimizer step ran after the last forward), so ``learned -> moving`` goes on from the trained value.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from qat_lightning.quant import set_qat_scales
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.qat import activation_nodes, io_quant_nodes

__all__ = ["apply_scales", "count_scales", "kept_pins_message", "make_learned", "release_scales"]


def _unlearn_if_absent(mode: str, node: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load hook: a checkpoint without this node's ``scale_param`` (another scale mode) loads as saved."""
    if f"{prefix}scale_param" not in state_dict and node.scale_mode == "learned":
        node.scale_mode = mode  # drops the parameter made in ``setup``: no missing key


def _sync_learned(nodes: Sequence[FakeQuantize]) -> None:
    """Copy each learned node's parameter into its ``scale`` buffer (reading ``scale`` does it)."""
    for node in nodes:
        if node.scale_mode == "learned":
            _ = node.scale


def make_learned(model: nn.Module) -> list[RemovableHandle]:
    """Make the ``scale_param`` of every activation node not learned yet (``setup`` of a learned fit).

    Nodes already learned (a previous learned fit) keep their trained values. Each node made here gets a
    load hook: a checkpoint restored without its ``scale_param`` (another scale mode) loads as saved.

    Args:
        model: the prepared network.

    Returns:
        The load hooks, to remove once every checkpoint is restored.
    """
    nodes = [n for _, n in activation_nodes(model) if n.scale_mode != "learned"]
    before = {id(n): n.scale_mode for n in nodes}
    set_qat_scales(model, "learned", nodes)
    return [
        n.register_load_state_dict_pre_hook(partial(_unlearn_if_absent, before[id(n)]))
        for n in nodes
        if n.scale_mode == "learned"
    ]


def release_scales(model: nn.Module) -> list[str]:
    """Put the activation nodes an earlier fit left learned back to ``moving`` (from the trained scale).

    Args:
        model: the prepared network.

    Returns:
        The names of the nodes changed.
    """
    changed = [(name, node) for name, node in activation_nodes(model) if node.scale_mode == "learned"]
    nodes = [node for _, node in changed]
    _sync_learned(nodes)
    set_qat_scales(model, "moving", nodes)
    return [name for name, _ in changed]


def _kept_pins(model: nn.Module, mode: str) -> list[str]:
    """Names of the nodes pinned (not by their qconfig) that ``mode`` does not pin itself."""
    if mode in ("fixed", "learned"):
        return []
    io = {id(n) for _, n in io_quant_nodes(model)} if mode == "fixed_input_output" else set()
    return [
        name
        for name, node in activation_nodes(model)
        if node.is_fixed and node.observer_name != "fixed" and id(node) not in io
    ]


def kept_pins_message(model: nn.Module, mode: str) -> str | None:
    """Return the warning naming the pinned nodes that stay pinned under ``mode`` (``None``: none).

    Args:
        model: the prepared network (after :func:`apply_scales`).
        mode: the callback's ``scales``.
    """
    names = _kept_pins(model, mode)
    if not names:
        return None
    return (
        f"QuantizationAwareTraining(scales={mode!r}): {len(names)} activation scale(s) pinned by hand or by "
        f"an earlier fit with scales='fixed' stay pinned (counted in qat/fixed_scales): {', '.join(names)}. "
        "Release them with set_qat_scales(model, 'moving', nodes) before the fit if they should move"
    )


def apply_scales(model: nn.Module, mode: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Apply the callback's ``scales`` mode (one of ``QAT_SCALES``) to every activation node.

    Args:
        model: the prepared, calibrated network.
        mode: ``"moving"``, ``"fixed_input_output"``, ``"fixed"`` or ``"learned"``.

    Returns:
        ``(released, made)``: the ``scale_param`` parameters that stopped being learned (to take out of the
        optimizers) and the ones made now (``learned``: normally none, ``setup`` made them).
    """
    nodes = [n for _, n in activation_nodes(model)]
    if mode == "learned":
        return [], set_qat_scales(model, "learned", [n for n in nodes if n.scale_mode != "learned"])
    released = [n.scale_param for n in nodes if n.scale_mode == "learned"]
    _sync_learned(nodes)
    if mode == "fixed":
        set_qat_scales(model, "fixed", nodes)
        return released, []
    set_qat_scales(model, "moving", [n for n in nodes if n.scale_mode == "learned"])  # pins stay
    if mode == "fixed_input_output":
        set_qat_scales(model, "fixed", [n for _, n in io_quant_nodes(model)])
    return released, []


def count_scales(model: nn.Module, mode: str) -> int:
    """Count the activation nodes as they are: learned ones for ``learned``, pinned ones for the others."""
    nodes = [n for _, n in activation_nodes(model)]
    if mode == "learned":
        return sum(1 for n in nodes if n.scale_mode == "learned")
    return sum(1 for n in nodes if n.is_fixed)
