"""``dynamic_block()``: mark code whose call count varies with the input (loops over ``x.shape[...]``).

Prepare probes the model once, on the example inputs, and gives every call site of a module its own
activation quant nodes (``fc``, ``fc#1``, ...). A loop whose trip count depends on the input
(``for i in range(x.shape[0])``) breaks that: at run time the module is called more (or fewer) times than
prepare saw. Wrap such a loop's body in ``with dynamic_block():``:

* eager mode: every call of a module inside a dynamic block is ONE call site (one op, one set of
  activation quant nodes shared by all iterations, whatever their number); a module called both inside
  and outside dynamic blocks is refused at prepare (give the two uses their own modules);
* fx / ``jit_strip``: torch.fx cannot represent a trip count that varies, so a dynamic block (and a loop
  over a shape) is an :class:`.fx_tracer.FxTraceError` naming the line; ``auto`` falls
  back to eager.

Outside dynamic blocks, an eager prepared model checks after each forward that no op was called more
often than the call sites prepare saw, and warns (naming the op) when one was: the extra calls reuse the
call sites' quant nodes in turn, statistics the example inputs never showed.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

__all__ = ["count_forward", "dynamic_block", "in_dynamic_block", "warn_extra_calls"]

_DEPTH = [0]


@contextmanager
def dynamic_block() -> Iterator[None]:
    """Mark the enclosed code as run a varying number of times (see the module docstring).

    Raises:
        FxTraceError: while torch.fx traces the model (use ``method='eager'`` or ``'auto'``).
    """
    if is_fx_tracing():
        from qat_lightning.quant.preparation.fx_tracer import FxTraceError, user_source_line

        where = user_source_line(sys._getframe())
        raise FxTraceError(
            "torch.fx cannot trace a dynamic_block() (code whose call count varies with the input)"
            f"{f' at {where}' if where else ''}; use prepare(..., method='eager') or method='auto'"
        )
    _DEPTH[0] += 1
    try:
        yield
    finally:
        _DEPTH[0] -= 1


def in_dynamic_block() -> bool:
    """Whether the code now running is inside a :func:`dynamic_block`."""
    return _DEPTH[0] > 0


def count_forward(model: nn.Module) -> None:
    """Forward pre-hook part: count running forwards of ``model`` (overlapping ones are not checked)."""
    depth = model.__dict__.get("_qat_forward_depth", 0)
    model.__dict__["_qat_forward_depth"] = depth + 1
    if depth:  # two forwards of one model at once (analysis lockstep, re-entry): counts are shared
        model.__dict__["_qat_forward_overlap"] = True


def warn_extra_calls(model: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of an eager prepared model: warn about ops called more often than prepare probed.

    Only a forward that ran alone is checked: overlapping forwards of the same model share the counters.
    """
    depth = model.__dict__.get("_qat_forward_depth", 1) - 1
    model.__dict__["_qat_forward_depth"] = depth
    if depth > 0:
        return
    if model.__dict__.pop("_qat_forward_overlap", False):
        return
    for op in model._qat_dispatchers:
        sites = op._sites
        if op._calls > len(sites) and not getattr(op, "_dynamic", False):
            warnings.warn(
                f"{op.op_info.name} was called {op._calls} times in this forward but prepare saw "
                f"{len(sites)} call site(s) on the example inputs: the extra calls reuse the call sites' "
                "quant nodes in turn. Use example inputs that run the code as often as it runs here, or "
                "wrap a loop over x.shape[...] in dynamic_block()",
                stacklevel=2,
            )
