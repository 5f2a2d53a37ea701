"""FLOP (MAC) counting of the ops ``prepare`` quantizes, shared by the fx and eager paths."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from qat_lightning.quant.preparation.tables import gemm_spec_of

__all__ = ["function_flops", "gemm_module_flops", "numel_of"]


def numel_of(shape: Sequence[int] | torch.Size | None) -> int:
    """Return the number of elements of a shape (0 for ``None``)."""
    return 0 if shape is None else int(math.prod(shape))


def gemm_module_flops(
    module: nn.Module, in_shape: Sequence[int] | None, out_shape: Sequence[int] | None
) -> int:
    """MACs of one call of a conv / conv-transpose / linear module for the given input/output shapes.

    An embedding lookup computes nothing; it counts one op per output element, like other non-gemm ops.
    """
    spec = gemm_spec_of(module)
    if spec is None or out_shape is None:
        return 0
    if spec.kind == "embedding":
        return numel_of(out_shape)
    weight = module.weight
    if spec.kind == "linear":
        return numel_of(out_shape) * int(weight.shape[1])
    k = numel_of(weight.shape[2:])
    if spec.kind == "conv":
        return numel_of(out_shape) * int(weight.shape[1]) * k
    # conv-transpose: each input element scatters into out_channels / groups * kernel outputs
    return numel_of(in_shape) * int(weight.shape[1]) * k


def function_flops(
    base: str, arg_shapes: Sequence[Sequence[int] | None], out_shape: Sequence[int] | None
) -> int:
    """MACs of a functional gemm (product of the matmul dims), else one op per output element."""
    out = numel_of(out_shape)
    if base in ("matmul", "bmm") and arg_shapes and arg_shapes[0] is not None and len(arg_shapes[0]) >= 1:
        return out * int(arg_shapes[0][-1])
    if base == "scaled_dot_product_attention" and len(arg_shapes) > 1 and arg_shapes[1]:
        return 2 * out * int(arg_shapes[1][-2])  # q @ k^T and probs @ v (key length S each)
    if base == "linear" and len(arg_shapes) > 1 and arg_shapes[1] is not None:
        return out * int(arg_shapes[1][-1])
    if base.startswith("conv") and len(arg_shapes) > 1 and arg_shapes[1] is not None:
        w = arg_shapes[1]
        return out * int(w[1]) * numel_of(w[2:])
    return out
