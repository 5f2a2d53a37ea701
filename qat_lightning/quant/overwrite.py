"""When a QAT quant node may write its result into its input: :func:`overwrite_target`.

An op module (conv, linear, matmul, add, LayerNorm, GELU, ...) hands its output quant node a tensor that
nothing else holds: the op's fresh result. Writing the fake-quantized values into that tensor instead of a
new one saves a buffer that is not in the cache (on this machine's 2 MiB - 8 MiB activations the quant
node then reads and writes memory the op has just written). It is only safe when autograd kept nothing
that aliases the result: the op that produced it must not save its own output for backward (softmax,
sigmoid, tanh, exp and ReLU do; linear, matmul, add, mul, LayerNorm, GELU do not), and the result must be
the whole of its storage.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["overwrite_target"]

# attributes of torch's generated autograd nodes that hold the node's own (first) output
_SAVED_OUTPUT = ("_saved_result", "_saved_result0", "_saved_output")
# nodes whose output is the whole of another op's fresh result, reshaped (F.linear on 3-d input, matmul)
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_SAVES_OUTPUT: dict[type, bool] = {}


def _saves_output(node: object) -> bool:
    """Whether autograd node ``node`` may keep its output (always true for a custom Function's node)."""
    kind = type(node)
    saves = _SAVES_OUTPUT.get(kind)
    if saves is None:  # class attributes only: reading a saved tensor would unpack it
        saves = kind.__module__ != "builtins" or any(hasattr(kind, name) for name in _SAVED_OUTPUT)
        _SAVES_OUTPUT[kind] = saves
    return saves


def overwrite_target(x: Tensor) -> Tensor | None:
    """Return the tensor whose memory may take the fake-quantized ``x``: ``x``, its reshaped base, or None.

    Call only with a tensor the caller alone holds (an op's fresh result). ``x`` must be a contiguous
    non-leaf; if it is a view, it must be a reshape covering all of a non-view base that no other node
    saved. The base is returned then (the caller quantizes the base in place and reshapes the result).
    """
    node = x.grad_fn
    if node is None or not x.is_contiguous() or _saves_output(node):
        return None
    if type(node).__name__ in _RESHAPES:
        producer = node.next_functions[0][0] if node.next_functions else None
        if producer is None or _saves_output(producer):
            return None
    if not x._is_view():
        return x
    base = x._base
    if (
        base is None
        or base._is_view()
        or base.grad_fn is None
        or type(node).__name__ not in _RESHAPES
        or not base.is_contiguous()
        or base.numel() != x.numel()
        or base.data_ptr() != x.data_ptr()
    ):
        return None
    return base if base.dtype == torch.float32 else None
