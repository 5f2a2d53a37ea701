"""Index-op replacement: the quantized model reuses the float model's indices during analysis.

Index-producing ops (``sort``, ``argsort``, ``topk``, ``argmax``, ``argmin``, as ``torch.*`` functions or
tensor methods) turn tiny quantization errors into different selections, after which outputs are no longer
comparable (the seed: "the debug tool supports automatic replacement of sort/topk/argmax"). During
analysis the float run executes under :class:`IndexRecorder`, a ``torch.overrides.TorchFunctionMode``
that records every index result in call order (with the input shape). The quantized run executes under
:class:`IndexReplayer`, which answers the k-th index op with the k-th recorded indices instead of
computing its own; ``sort``/``topk`` values are gathered from the quantized input at those indices
(``input.gather(dim, indices)``), so they carry the quantization error but follow the float order.

A replayed call must match its record (same op, same input shape); on the first mismatch (different
control flow, other batch) the replayer warns once and computes the rest normally. Ops it does not
cover (``max``/``min`` with ``dim``, ``unique``, ``nonzero``, NMS) are not replaced: remove them from
the analysed model as the seed says. Modes are thread-local, so each analysis thread installs its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["INDEX_OPS", "IndexRecord", "IndexRecorder", "IndexReplayer"]

# op -> (kind, position of ``dim`` in args (after the input), default dim, returns values too)
INDEX_OPS: dict[Any, tuple[str, int, int | None, bool]] = {
    torch.sort: ("sort", 1, -1, True),
    torch.Tensor.sort: ("sort", 1, -1, True),
    torch.argsort: ("argsort", 1, -1, False),
    torch.Tensor.argsort: ("argsort", 1, -1, False),
    torch.topk: ("topk", 2, -1, True),
    torch.Tensor.topk: ("topk", 2, -1, True),
    torch.argmax: ("argmax", 1, None, False),
    torch.Tensor.argmax: ("argmax", 1, None, False),
    torch.argmin: ("argmin", 1, None, False),
    torch.Tensor.argmin: ("argmin", 1, None, False),
}

_RETURN_TYPES = {"sort": torch.return_types.sort, "topk": torch.return_types.topk}


@dataclass(frozen=True)
class IndexRecord:
    """One index op of the float run: its kind, its input shape and the indices it returned."""

    kind: str
    input_shape: tuple[int, ...]
    indices: Tensor


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    value = args[0] if args else kwargs.get("input", kwargs.get("self"))
    return value if isinstance(value, Tensor) else None


def _dim_of(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, default: int | None) -> int | None:
    if len(args) > pos:
        return args[pos]
    return kwargs.get("dim", default)


class IndexRecorder(TorchFunctionMode):
    """Records the indices of every index op in call order (``records``)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[IndexRecord] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        spec = INDEX_OPS.get(func)
        if spec is not None:
            x = _input_of(args, kwargs)
            indices = out[1] if spec[3] else out
            if x is not None and isinstance(indices, Tensor):
                self.records.append(IndexRecord(spec[0], tuple(x.shape), indices.detach().clone()))
        return out


class IndexReplayer(TorchFunctionMode):
    """Answers the k-th index op with ``records[k]`` (see the module docstring).

    Args:
        records: what an :class:`IndexRecorder` recorded in the float run.
        wait_for: optional ``wait_for(k)`` called when record ``k`` does not exist yet (the float run
            runs in lockstep in another thread); it returns once the record exists or never will.
    """

    def __init__(self, records: list[IndexRecord], wait_for: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.records = records
        self.wait_for = wait_for
        self.count = 0
        self.diverged = False
        self.replayed = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        spec = INDEX_OPS.get(func)
        if spec is None or self.diverged:
            return func(*args, **kwargs)
        kind, dim_pos, default_dim, with_values = spec
        k = self.count
        self.count += 1
        if k >= len(self.records) and self.wait_for is not None:
            self.wait_for(k)
        x = _input_of(args, kwargs)
        record = self.records[k] if k < len(self.records) else None
        if record is None or x is None or record.kind != kind or record.input_shape != tuple(x.shape):
            self.diverged = True
            warnings.warn(
                f"index-op replacement stopped at call {k} ({kind}): the quantized run does not match the "
                "float run's index ops; the remaining index ops are computed from quantized values",
                stacklevel=2,
            )
            return func(*args, **kwargs)
        self.replayed += 1
        indices = record.indices.to(x.device)
        if not with_values:
            return indices
        dim = _dim_of(args, kwargs, dim_pos, default_dim)
        values = x.gather(dim, indices) if x.dim() else x.clone()
        return _RETURN_TYPES[kind]((values, indices))
