"""Reuse eval-mode BN folds while the parameters do not change: :func:`frozen_parameters`.

A fused conv-bn op (``QatConvBn``, ``fuse_bn``) in eval mode runs one conv with the BN folded into its
weight. Outside :func:`frozen_parameters` that fold is recomputed every forward (one pass over the conv
weights), so an edit of a parameter through ``.data``, which PyTorch does not version, is always seen.
Inside, each op keeps its fold and reuses it while its parameters and BN statistics keep their identity
and version (any in-place change through the parameter itself, an optimizer step or ``load_state_dict``
moves the version). On the benchmark CNN, eager, reusing the fold saves about 0.15 of a
float forward in FLOAT and VALIDATION state (benchmarks/README.md, "QAT step").

The analysis tools (``analysis_mode``) and the ``QuantizationAwareTraining`` callback's validation, test
and predict loops run inside it. Use it around your own evaluation loops; do not edit parameters through
``.data`` (in place, or by assigning a new ``.data``) inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from qat_lightning.quant.nodes.qat_modules import QatConvBn

__all__ = ["frozen_parameters"]


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Let the fused conv-bn ops of ``model`` keep and reuse their eval-mode BN fold inside the block.

    Nested blocks are fine; leaving the outermost one drops the kept folds.

    Args:
        model: any module; its ``QatConvBn`` ops are affected, nothing else.

    Yields:
        ``model``.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen_parameters needs an nn.Module, got {type(model).__name__}")
    ops = [m for m in model.modules() if isinstance(m, QatConvBn)]
    for op in ops:
        op.__dict__["_reuse_fold"] = op.__dict__.get("_reuse_fold", 0) + 1
    try:
        yield model
    finally:
        for op in ops:
            depth = op.__dict__.pop("_reuse_fold", 1) - 1
            if depth > 0:
                op.__dict__["_reuse_fold"] = depth
            else:
                op.__dict__.pop("_fold_cache", None)
