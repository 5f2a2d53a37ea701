"""QAT scale modes for a whole model: :func:`set_qat_scales` (``moving`` / ``fixed`` / ``learned``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from qat_lightning.quant.checks import require_module
from qat_lightning.quant.nodes.fake_quantize import SCALE_MODES, FakeQuantize, iter_fake_quantize

__all__ = ["SCALE_MODES", "set_qat_scales"]

NodeRef = FakeQuantize | str
"""A quant node of the module, or its qualified name (as ``iter_fake_quantize`` and the reports print it)."""


def _known(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def _resolve(module: nn.Module, nodes: NodeRef | Iterable[NodeRef]) -> list[tuple[str, FakeQuantize]]:
    """Return ``(name, node)`` for every item of ``nodes``, once each, in order; change nothing.

    Raises:
        TypeError: an item that is neither a ``FakeQuantize`` nor a name.
        ValueError: a node or name that is not one of ``module``'s quant nodes.
    """
    by_name = dict(iter_fake_quantize(module))
    by_id = {id(node): name for name, node in by_name.items()}
    items = [nodes] if isinstance(nodes, (str, FakeQuantize)) else list(nodes)
    resolved: dict[str, FakeQuantize] = {}
    for index, item in enumerate(items):
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(
                    f"set_qat_scales: nodes[{index}] {item!r} is not a quant node of the module; "
                    f"known: {_known(by_name)}"
                )
            resolved[item] = by_name[item]
        elif isinstance(item, FakeQuantize):
            if id(item) not in by_id:
                raise ValueError(
                    f"set_qat_scales: nodes[{index}] (a FakeQuantize named {item.name!r}) is not a quant "
                    "node of the module; pass the module's own nodes (iter_fake_quantize) or their names"
                )
            resolved[by_id[id(item)]] = item
        else:
            raise TypeError(
                f"set_qat_scales: nodes[{index}] must be a FakeQuantize of the module or its qualified name "
                f"(e.g. {next(iter(by_name), 'fc.output_quant')!r}), got {type(item).__name__} {item!r:.60}"
            )
    return list(resolved.items())


def _check_learnable(chosen: list[tuple[str, FakeQuantize]]) -> None:
    """Refuse ``learned`` for per-channel or float nodes, naming them all, before any change."""
    bad = [name for name, node in chosen if node.ch_axis is not None or not node.dtype.is_integer]
    if bad:
        raise ValueError(
            f"set_qat_scales: mode 'learned' needs per-tensor integer nodes; not so: {_known(bad)} "
            "(per-channel weight scales follow the weights; float nodes have no scale)"
        )


def set_qat_scales(
    module: nn.Module, mode: str, nodes: NodeRef | Iterable[NodeRef] | None = None
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
        nodes: the nodes to change (default: every per-tensor integer node of ``module``): quant nodes of
            ``module`` or their qualified names (``"head.output_quant"``), or one of them alone; a node
            listed twice is changed once.

    Returns:
        The learned scale parameters (empty unless ``mode="learned"``), one per node.

    Raises:
        TypeError: ``module`` is not a module, or an item of ``nodes`` is neither a node nor a name.
        ValueError: for an unknown mode, a node or name that is not in ``module``, or ``learned`` for a
            per-channel or float node; all checked before anything is changed.
    """
    require_module(module, "set_qat_scales")
    if mode not in SCALE_MODES:
        raise ValueError(f"unknown QAT scale mode {mode!r}; allowed: {', '.join(SCALE_MODES)}")
    if nodes is None:
        chosen = [(k, n) for k, n in iter_fake_quantize(module) if n.ch_axis is None and n.dtype.is_integer]
    else:
        chosen = _resolve(module, nodes)
    chosen = [(k, n) for k, n in chosen if n.observer_name != "fixed"]  # a fixed observer stays fixed
    if mode == "learned":
        _check_learnable(chosen)
    params = []
    for _, node in chosen:
        node.scale_mode = mode
        if mode == "learned":
            params.append(node.scale_param)
    return params
