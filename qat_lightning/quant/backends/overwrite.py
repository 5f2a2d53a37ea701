"""When a QAT quant node may write into a tensor instead of a new one: forward and backward.

* :func:`overwrite_target`: the forward writes its result into the op's output.
* :func:`grad_holders` / :func:`exclusive_grad`: the backward writes the masked gradient into the
  incoming gradient.

An op module (conv, linear, matmul, add, LayerNorm, GELU, ...) hands its output quant node a tensor that
nothing else holds: the op's fresh result. Writing the fake-quantized values into that tensor instead of a
new one saves a buffer that is not in the cache (on this machine's 2 MiB - 8 MiB activations the quant
node then reads and writes memory the op has just written). It is only safe when autograd kept nothing
that aliases the result: the op that produced it must not save its own output for backward (softmax,
sigmoid, tanh, exp and ReLU do; linear, matmul, add, mul, LayerNorm, GELU do not), and the result must be
the whole of its storage.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

__all__ = ["overwrite_target", "grad_holders", "exclusive_grad"]

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


# ---- backward ------------------------------------------------------------------------------------------
# The incoming gradient of a node may also be held elsewhere: the same tensor handed to two branches (an add
# passes its gradient to both inputs), captured by ``torch.autograd.grad``, kept by a tensor hook, or a view
# of a tensor someone else holds. The engine itself only steals a gradient buffer when it holds the only
# reference (``use_count() == 1``, its InputBuffer accumulation); here the same counts are taken (tensor,
# Python object, storage, and the base of a view) and compared with those of a gradient known to be
# exclusive, measured once by a probe that goes through the same call path.


def grad_holders(grad: Tensor) -> tuple[object, ...] | None:
    """Count who holds ``grad`` (and its base when it is a view); None if it may not be overwritten.

    Call it directly from a custom Function's ``backward`` (the Python count depends on the call depth).
    Only a contiguous float32 CPU gradient that does not itself require grad qualifies.
    """
    if grad.requires_grad or grad.dtype != torch.float32 or grad.device.type != "cpu":
        return None
    if not grad.is_contiguous():
        return None
    counts: tuple[object, ...] = (
        grad._use_count(),
        sys.getrefcount(grad),
        torch._C._storage_Use_Count(grad.untyped_storage()._cdata),
    )
    if grad._is_view():
        base = grad._base
        counts += (base._use_count(), sys.getrefcount(base), base.numel() == grad.numel(), base._is_view())
    return counts


def exclusive_grad(holders: tuple[object, ...] | None) -> bool:
    """Whether :func:`grad_holders` counts are those of a gradient nothing else holds."""
    return holders is not None and holders in _exclusive_counts()


_PROBED: list[tuple[object, ...] | None] = []


class _HolderProbe(torch.autograd.Function):
    """Identity whose backward records :func:`grad_holders` of its (exclusive) incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001, D102
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001, D102
        _PROBED.append(grad_holders(grad))
        return grad


@functools.cache
def _exclusive_counts() -> frozenset[tuple[object, ...]]:
    """Measure an exclusive plain gradient and an exclusive full-size view (an empty set on failure)."""
    _PROBED.clear()
    try:
        with torch.enable_grad():
            x = torch.ones(8, requires_grad=True)
            (_HolderProbe.apply(x * 2) * 3).sum().backward()  # a fresh gradient from MulBackward
            (_HolderProbe.apply(x * 2).view(2, 4) * 3).sum().backward()  # a view of a fresh gradient
    except RuntimeError:  # e.g. under inference mode: never overwrite
        return frozenset()
    probed = [c for c in _PROBED if c is not None]
    return frozenset(probed) if len(probed) == 2 else frozenset()


_exclusive_counts()  # probe at import, not from inside the first backward (a reentrant backward)
