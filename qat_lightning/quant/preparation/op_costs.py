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


_FIRST_OPERAND_GEMMS = frozenset({"matmul", "bmm", "mm", "mv", "dot", "vdot", "inner"})
_SECOND_OPERAND_GEMMS = frozenset({"addmm", "baddbmm", "addmv"})  # (input, a, b): ``a``'s last dim


def function_flops(
    base: str,
    arg_shapes: Sequence[Sequence[int] | None],
    out_shape: Sequence[int] | None,
    equation: str | None = None,
) -> int:
    """MACs of a functional gemm (product of the matmul dims), else one op per output element.

    Gemms: ``matmul`` / ``bmm`` / ``mm`` / ``mv`` / ``dot``, ``addmm`` / ``baddbmm`` / ``addmv`` (the
    contraction is the second operand's last dim), ``addbmm`` (summed over the batch too), ``linear``,
    convolutions, ``scaled_dot_product_attention`` and ``einsum`` (with its ``equation``: the output's
    elements times the sizes of the contracted indices).
    """
    out = numel_of(out_shape)
    a = arg_shapes[0] if arg_shapes else None
    b = arg_shapes[1] if len(arg_shapes) > 1 else None
    if base in _FIRST_OPERAND_GEMMS and a is not None and len(a) >= 1:
        return max(out, 1) * int(a[-1])
    if base in _SECOND_OPERAND_GEMMS and b is not None and len(b) >= 1:
        return out * int(b[-1])
    if base == "addbmm" and b is not None and len(b) == 3:
        return out * int(b[0]) * int(b[-1])
    if base == "einsum" and equation is not None:
        return _einsum_flops(equation, [s for s in arg_shapes if s is not None], out)
    if base == "scaled_dot_product_attention" and len(arg_shapes) > 1 and arg_shapes[1]:
        return 2 * out * int(arg_shapes[1][-2])  # q @ k^T and probs @ v (key length S each)
    if base == "linear" and len(arg_shapes) > 1 and arg_shapes[1] is not None:
        return out * int(arg_shapes[1][-1])
    if base.startswith("conv") and len(arg_shapes) > 1 and arg_shapes[1] is not None:
        w = arg_shapes[1]
        return out * int(w[1]) * numel_of(w[2:])
    return out


def _einsum_flops(equation: str, shapes: Sequence[Sequence[int]], out: int) -> int:
    """Return the output's elements times the sizes of the indices summed over (``out`` if unparseable)."""
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if len(terms) != len(shapes):
        return out
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        letters = term.replace("...", "")  # an ellipsis covers the leading dims (part of the output)
        dims = list(shape)[len(shape) - len(letters) :] if "..." in term else list(shape)
        if len(dims) != len(letters):
            return out
        sizes.update({c: int(d) for c, d in zip(letters, dims, strict=True)})
    if not arrow:  # implicit output: the indices that appear once
        output = "".join(c for c in sizes if inputs.count(c) == 1)
    return out * math.prod(v for c, v in sizes.items() if c not in output)
