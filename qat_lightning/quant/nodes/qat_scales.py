"""QAT scale modes for a whole model: :func:`set_qat_scales` (``moving`` / ``fixed`` / ``learned``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from qat_lightning.quant.nodes.fake_quantize import SCALE_MODES, FakeQuantize, iter_fake_quantize

__all__ = ["SCALE_MODES", "set_qat_scales"]


def set_qat_scales(
    module: nn.Module, mode: str, nodes: Iterable[FakeQuantize] | None = None
) -> list[nn.Parameter]:
    """Set how QAT moves the activation scales of ``module``: ``moving``, ``fixed`` or ``learned``.

    Applies to the per-tensor integer nodes (activations) of ``module``, or to ``nodes`` when given;
    per-channel weight scales always follow the weights (``fixed`` pins activations only). Call it after
    calibration: every mode starts from the calibrated scale. In ``learned`` mode each node gets a
    parameter ``scale_param``: add the returned parameters to the optimizer (or call this before the
    optimizer is built).

    Args:
        module: a prepared model (or any module holding quant nodes).
        mode: one of :data:`SCALE_MODES`.
        nodes: the nodes to change (default: every per-tensor integer node of ``module``).

    Returns:
        The learned scale parameters (empty unless ``mode="learned"``).

    Raises:
        ValueError: for an unknown mode, before anything is changed.
    """
    if mode not in SCALE_MODES:
        raise ValueError(f"unknown QAT scale mode {mode!r}; allowed: {', '.join(SCALE_MODES)}")
    if nodes is None:
        nodes = [n for _, n in iter_fake_quantize(module) if n.ch_axis is None and n.dtype.is_integer]
    params = []
    for node in nodes:
        if node.observer_name == "fixed":
            continue  # a fixed-scale observer stays fixed whatever the mode
        node.scale_mode = mode
        if mode == "learned":
            params.append(node.scale_param)
    return params
