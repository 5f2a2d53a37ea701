"""Temporary quant-state changes used by the analysis, all as context managers that restore.

* :func:`analysis_mode`: the model as the seed's "calibration model" is evaluated: ``eval()`` and every
  quant node in ``VALIDATION`` (frozen scales, nothing observed), except nodes already in ``FLOAT``
  (partial quantization is respected); eval-mode BN folds are reused (``frozen_parameters``).
* :func:`only_enabled`: every quant node of the model in ``FLOAT`` except the given ones (``VALIDATION``),
  the sensitivity set-up.
* :func:`node_dtypes`: set some nodes' dtypes (``fq.dtype = d``: scale recomputed from the kept observer
  statistics, no recalibration) and put dtype *and* scale back afterwards (a QAT-trained scale is
  restored exactly, not recomputed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qat_lightning.quant.dtypes import DtypeLike, parse_dtype
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize
from qat_lightning.quant.nodes.frozen import frozen_parameters

__all__ = ["analysis_mode", "only_enabled", "node_dtypes", "eval_mode"]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put the models (every submodule) in eval mode; restore each submodule's own flag afterwards."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextmanager
def analysis_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``eval()`` and QAT/CALIBRATION nodes → VALIDATION (FLOAT nodes stay FLOAT); restores both.

    Every node's scale is brought up to date here (``node.scale`` recomputes a scale whose statistics
    changed), so no observer computation runs lazily inside an analysed forward (where index-op
    recording would see the observer's own ``argmin``).
    """
    saved = [(node, node.state) for _, node in iter_fake_quantize(model)]
    with eval_mode(model), frozen_parameters(model):
        try:
            for node, state in saved:
                if state is not FakeQuantState.FLOAT:
                    node.state = FakeQuantState.VALIDATION
                node.scale  # noqa: B018 - refreshes a stale scale now
            yield model
        finally:
            for node, state in saved:
                node.state = state


@contextmanager
def only_enabled(model: nn.Module, nodes: Iterable[FakeQuantize]) -> Iterator[None]:
    """Every quant node of ``model`` FLOAT except ``nodes`` (VALIDATION); restores each node's state."""
    enabled = {id(n) for n in nodes}
    saved = [(node, node.state) for _, node in iter_fake_quantize(model)]
    try:
        for node, _ in saved:
            node.state = FakeQuantState.VALIDATION if id(node) in enabled else FakeQuantState.FLOAT
        yield
    finally:
        for node, state in saved:
            node.state = state


@contextmanager
def node_dtypes(assignments: Mapping[FakeQuantize, DtypeLike]) -> Iterator[None]:
    """Set node dtypes (scales recomputed from kept statistics); restore dtypes and scales exactly.

    A learned (LSQ) scale is restored too: the dtype change rewrites ``scale_param`` as well as ``scale``.
    """
    parsed = [(node, parse_dtype(dtype)) for node, dtype in assignments.items()]
    saved = [(node, node.dtype, [t.detach().clone() for t in _scale_tensors(node)]) for node, _ in parsed]
    try:
        for node, dtype in parsed:
            if node.dtype != dtype:
                node.dtype = dtype
        yield
    finally:
        for node, dtype, scales in saved:
            if node.dtype != dtype:
                node.dtype = dtype
            with torch.no_grad():
                for tensor, value in zip(_scale_tensors(node), scales, strict=True):
                    tensor.copy_(value)


def _scale_tensors(node: FakeQuantize) -> list[Tensor]:
    """Return the node's scale and, with a learned scale, its ``scale_param``."""
    learned = node._parameters.get("scale_param")
    return [t for t in (node.scale, learned) if t is not None]


def set_states(pairs: Iterable[tuple[FakeQuantize, FakeQuantState]]) -> None:
    """Assign states to nodes (helper for code that saved ``(node, state)`` pairs)."""
    for node, state in pairs:
        node.state = state
