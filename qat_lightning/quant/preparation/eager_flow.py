"""Which op feeds which in an eager-prepared model, looking through the functional code between the ops.

Eager mode swaps modules only, so the functional ops and operators between them (``F.relu``, ``+``,
``torch.cat``, ``x.flatten(1)``, ...) stay float and the ops' ``input_producers`` cannot see through them.
The probe run with a ``TorchFunctionMode`` (:mod:`.eager_probe`) follows every tensor instead: a
:class:`FlowTracker` labels each tensor with the module calls (and model inputs) it was computed from,
looking through the functions fx would quantize or look through (so the result agrees with the
fx-prepared model's producers); :func:`resolve_dataflow` maps the labels onto the planned ops. The
:class:`EagerDataflow` is kept on the prepared model (:func:`eager_dataflow`) for
``qat_lightning.quant.qat.io_quant_nodes``. :class:`DirectSources` labels each tensor with the module call
(or model input) whose output it *is* (looking through data movement only, not through in-place changes):
eager prepare's ``input_producers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.preparation.tables import (
    FUNCTION_OPS,
    METHOD_OPS,
    TRANSPARENT_FUNCTIONS,
    TRANSPARENT_METHODS,
)

__all__ = [
    "Changed",
    "DATAFLOW_ATTR",
    "DirectSources",
    "InputSource",
    "EagerDataflow",
    "FlowTracker",
    "ProbeFlow",
    "Source",
    "connects",
    "eager_dataflow",
    "method_base",
    "resolve_dataflow",
    "tensor_method",
]

Source = str | tuple[str, int]
"""Where a tensor comes from: a model input (its name) or a module call ``(path, call index)``."""
CallKey = tuple[str, int]
DATAFLOW_ATTR = "_qat_dataflow"
"""The attribute of an eager-prepared model holding its :class:`EagerDataflow`."""


def _tensor_attrs() -> dict[int, str]:
    """``id`` of each ``Tensor`` method / operator -> its name (stable objects only: their ids stay valid)."""
    found: dict[int, str] = {}
    for name in dir(Tensor):
        value = getattr(Tensor, name, None)
        if value is not None and value is getattr(Tensor, name, None):
            found.setdefault(id(value), name)
    return found


_TENSOR_ATTRS = _tensor_attrs()


def tensor_method(func: Any) -> str | None:
    """Return the ``Tensor`` attribute name of ``func`` (``"view"``, ``"__getitem__"``), else ``None``."""
    return _TENSOR_ATTRS.get(id(func))


def method_base(name: str) -> str | None:
    """``Tensor`` attribute name -> method base (``__radd__`` -> ``add``, ``__getitem__`` -> ``getitem``)."""
    if name == "__getitem__":
        return "getitem"
    if not (name.startswith("__") and name.endswith("__")):
        return name
    core = name[2:-2]
    for candidate in (core, core[1:]):  # __add__, __radd__ / __iadd__
        candidate = "div" if candidate in ("truediv", "div") else candidate
        if candidate in METHOD_OPS:
            return candidate
    return None


def connects(func: Any) -> bool:
    """Tell whether the data flow runs through ``func``: fx quantizes it or looks through it."""
    name = _TENSOR_ATTRS.get(id(func))
    if name is not None:
        base = method_base(name)
        return base is not None and (base in METHOD_OPS or base in TRANSPARENT_METHODS or base == "getitem")
    if func is F.scaled_dot_product_attention:
        return True
    try:
        return func in FUNCTION_OPS or func in TRANSPARENT_FUNCTIONS
    except TypeError:  # unhashable
        return False


def _tensors(value: Any, depth: int = 0) -> list[Tensor]:
    """Return the tensors in ``value`` (nested lists, tuples, dicts, dataclasses)."""
    found = []
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type) and depth < 20:
            found += _tensors([getattr(leaf, f.name, None) for f in dataclasses.fields(leaf)], depth + 1)
    return found


@dataclass(frozen=True)
class Changed:
    """A tensor that was the output of ``source`` and has been changed in place since (``y += z``)."""

    source: Source


InputSource = Source | Changed | None
"""Where a module call's tensor input comes from: a source, a changed one, or ``None`` (computed)."""


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return 0


def _looks_through(func: Any) -> bool:
    """Tell whether fx's producer lookup looks through ``func`` (views, reshapes, indexing, dropout)."""
    name = tensor_method(func)
    if name is not None:
        return name in TRANSPARENT_METHODS or name == "__getitem__"
    try:
        return func in TRANSPARENT_FUNCTIONS
    except TypeError:  # unhashable
        return False


class DirectSources:
    """Which module call (or model input) each tensor is the output of, during the probe run.

    Looked through: data movement (:data:`.tables.TRANSPARENT_FUNCTIONS` / ``TRANSPARENT_METHODS``,
    indexing), as fx's producer lookup does. A tensor keeps its label while its version counter stands
    still; an in-place op on it (or on a view of it: ``y += z``, ``y.add_(z)``, ``inplace=True``,
    ``y[i] = z``) moves the counter, and it reads as :class:`Changed` from then on.
    """

    def __init__(self, inputs: Mapping[str, Any]) -> None:
        self.labels: dict[int, tuple[int, Source | Changed]] = {}
        self.keep: list[Tensor] = []  # labelled tensors stay alive, so their ids are not reused
        for name, value in inputs.items():
            if isinstance(value, Tensor):  # nested tensors get no input op
                self._label(value, name)

    def _label(self, t: Tensor, source: Source | Changed) -> None:
        self.labels[id(t)] = (_version(t), source)
        self.keep.append(t)

    def of(self, value: Any) -> InputSource:
        """Return the source of ``value`` now (``None`` for a computed tensor or a non-tensor)."""
        entry = self.labels.get(id(value)) if isinstance(value, Tensor) else None
        if entry is None:
            return None
        version, source = entry
        if version == _version(value) or isinstance(source, Changed):
            return source
        return Changed(source)

    def call_inputs(self, args: Sequence[Any]) -> tuple[InputSource, ...]:
        """Return the source of each positional tensor argument of a module call."""
        return tuple(self.of(a) for a in args if isinstance(a, Tensor))

    def module_output(self, key: CallKey, output: Any) -> None:
        """Label the (tensor) output of a module call with it."""
        if isinstance(output, Tensor):
            self._label(output, key)

    def function(self, func: Any, args: Any, kwargs: Any, result: Any) -> None:
        """Give the results of a data-movement function the source of its first tensor input."""
        if not _looks_through(func):
            return
        first = next(iter(_tensors((args, kwargs))), None)
        source = self.of(first)
        for t in _tensors(result) if source is not None else ():
            if t is not first:
                self._label(t, source)


@dataclass(frozen=True)
class ProbeFlow:
    """What the probe run saw of the data flow.

    Attributes:
        calls: each quantizable / pass-through module call -> the sources of its tensor inputs.
        sinks: sources of the tensors that went into a function with a tensor result that does not carry
            the flow (fx leaves it float too and its input producers stop there, e.g. ``x.abs()``).
        outputs: sources of the tensors the model returned.
        inputs: each quantizable / pass-through module call -> the :class:`DirectSources` source of each
            positional tensor input (its input producers).
    """

    calls: Mapping[CallKey, frozenset[Source]]
    sinks: frozenset[Source]
    outputs: frozenset[Source]
    inputs: Mapping[CallKey, tuple[InputSource, ...]] = field(default_factory=dict)


class FlowTracker:
    """Labels tensors with their sources during the probe run (see the module docstring)."""

    def __init__(self, inputs: Mapping[str, Any]) -> None:
        self.sources: dict[int, frozenset[Source]] = {}
        self.calls: dict[CallKey, frozenset[Source]] = {}
        self.sinks: set[Source] = set()
        self.keep: list[Any] = []  # labelled tensors stay alive, so their ids are not reused
        for name, value in inputs.items():
            for t in _tensors(value):
                self._label(t, frozenset({name}))

    def _label(self, t: Tensor, sources: frozenset[Source]) -> None:
        self.sources[id(t)] = sources
        self.keep.append(t)

    def sources_of(self, value: Any) -> frozenset[Source]:
        """Return the union of the sources of every tensor in ``value``."""
        found: set[Source] = set()
        for t in _tensors(value):
            found |= self.sources.get(id(t), frozenset())
        return frozenset(found)

    def module_call(self, key: CallKey, args: Any, kwargs: Any) -> None:
        """Record where the inputs of a quantizable / pass-through module call come from."""
        self.calls[key] = self.sources_of((args, kwargs))

    def module_output(self, key: CallKey, output: Any) -> None:
        """Label the output tensors of that call with it."""
        for t in _tensors(output):
            self._label(t, frozenset({key}))

    def function(self, func: Any, args: Any, kwargs: Any, result: Any) -> None:
        """Carry (or stop) the flow to the results of a function run outside the quantizable modules."""
        sources = self.sources_of((args, kwargs))
        inputs = {id(t) for t in _tensors((args, kwargs))}
        outs = _tensors(result)
        carries = connects(func)
        if _TENSOR_ATTRS.get(id(func)) == "__setitem__" and args and isinstance(args[0], Tensor):
            outs, carries = [args[0]], True  # x[i] = y writes y into x (fx cannot trace it at all)
        if outs and not carries:  # metadata reads (x.shape, x.dim()) consume no values
            self.sinks |= sources
        for t in outs:
            if id(t) in inputs:  # in place (x += y, x.relu_()): the tensor now also depends on the others
                if carries:
                    self._label(t, self.sources.get(id(t), frozenset()) | sources)
            else:
                self._label(t, sources if carries else frozenset())

    def finish(self, output: Any, inputs: Mapping[CallKey, tuple[InputSource, ...]]) -> ProbeFlow:
        """Return the flow of the whole run, given the model's output and the calls' input sources."""
        return ProbeFlow(dict(self.calls), frozenset(self.sinks), self.sources_of(output), dict(inputs))


@dataclass(frozen=True)
class EagerDataflow:
    """Which ops feed which in an eager-prepared model.

    Attributes:
        producers: op name -> the ops whose outputs reach its inputs, through the float code between
            them (functional ops, operators, pass-through modules).
        untraced: ops whose output reached neither another op nor the model output as far as the probe
            could follow it (it went into code a ``TorchFunctionMode`` cannot see, or nowhere).
        error: why the data flow is unknown (the probe could not record it), else ``None``.
    """

    producers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    untraced: tuple[str, ...] = ()
    error: str | None = None

    def consumed(self) -> set[str]:
        """Return the ops whose output feeds another op (an op in a loop feeding itself does not count)."""
        return {p for name, found in self.producers.items() for p in found if p != name}


def eager_dataflow(model: nn.Module) -> EagerDataflow | None:
    """Return the :class:`EagerDataflow` that eager ``prepare`` kept on ``model``, or ``None``."""
    flow = getattr(model, DATAFLOW_ATTR, None)
    return flow if isinstance(flow, EagerDataflow) else None


def resolve_dataflow(
    flow: ProbeFlow | None,
    error: str | None,
    call_ops: Mapping[CallKey, str],
    through: set[CallKey],
    input_ops: Mapping[str, str],
    ops: Sequence[OpInfo],
) -> EagerDataflow:
    """Map the probe's sources onto the planned ops.

    Args:
        flow: the probe's :class:`ProbeFlow`, or ``None`` when it could not be recorded.
        error: why ``flow`` is ``None``.
        call_ops: module call -> the op planned for it.
        through: the pass-through module calls (their output is their input).
        input_ops: model input name -> its input op.
        ops: every planned op.
    """
    if flow is None:
        return EagerDataflow(error=error or "the probe run did not record the data flow")
    memo: dict[CallKey, frozenset[str]] = {}

    def resolve(sources: frozenset[Source], depth: int = 0) -> set[str]:
        found: set[str] = set()
        for src in sources:
            if isinstance(src, str):
                found.update([input_ops[src]] if src in input_ops else [])
            elif src in call_ops:
                found.add(call_ops[src])
            elif src in through and depth < 1000:
                if src not in memo:
                    memo[src] = frozenset(resolve(flow.calls.get(src, frozenset()), depth + 1))
                found |= memo[src]
        return found

    producers: dict[str, set[str]] = {}
    for key, name in call_ops.items():
        producers.setdefault(name, set()).update(resolve(flow.calls.get(key, frozenset())))
    cut = (key for key in flow.calls if key not in call_ops and key not in through)
    reached = resolve(flow.sinks) | resolve(flow.outputs)
    for key in cut:  # a call without an op (e.g. a non-float output): fx leaves it float too
        reached |= resolve(flow.calls[key])
    result = EagerDataflow({op.name: tuple(sorted(producers.get(op.name, ()))) for op in ops})
    consumed = result.consumed()
    untraced = tuple(
        op.name
        for op in ops
        if op.kind != OpKind.INPUT and op.name not in consumed and op.name not in reached
    )
    return dataclasses.replace(result, untraced=untraced)
