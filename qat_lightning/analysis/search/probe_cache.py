"""Search probes served from cached activations upstream of the first changed op.

A probe of :func:`~qat_lightning.analysis.search.mixed_precision.search_mixed_precision` changes a few node
dtypes and calls ``eval_fn(model)``, which runs the whole model over the user's batches; every node upstream
of the first changed op computes what an earlier probe computed. While a probe runs, :class:`ActivationReuse`
serves the forward of an fx ``GraphModule`` (an instance ``forward`` over the class's):

* the k-th forward call of a probe is matched with the k-th call of the kept runs (earlier probes'). A run
  is used only if the call's inputs are bitwise equal to the run's (same structure, dtypes, shapes,
  strides, devices, bits), none of its kept tensors was modified since (version counters) and no
  parameter or buffer outside the quant nodes changed (version counters);
* the quant nodes whose state differs from the run's (state, dtype, scale mode, scale values bitwise)
  give the start nodes (:meth:`GraphSlicer.start_nodes`); only they and the nodes downstream of them are
  executed (:meth:`GraphSlicer.run_nodes`: node for node what the forward does), every other value is
  read from the run. ``reference="nearest"`` takes the kept run with the fewest nodes to execute,
  ``"base"`` the first probe's run only;
* a call without a usable run executes the whole graph node by node and is kept (``nearest``: every
  served call is kept too; kept runs share unchanged tensors). The oldest runs are dropped while the
  kept activations exceed the budget;
* the real forward runs (nothing kept) when a module is in training mode, grad mode is on, a quant node
  is in QAT or CALIBRATION, the inputs are not a tuple or dict of tensors and plain values, or the
  global fake-quant switches changed. Reuse is off for the whole search when the model is not a
  ``GraphModule``, its graph mutates a value in place (:attr:`GraphSlicer.safe`) or draws random numbers
  (the RNG state moves during a run).

Under ``torch.inference_mode`` the node-by-node runs execute with inference mode and grad off, so the
kept tensors have version counters; the values are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import Node, map_arg

from qat_lightning.analysis.sensitivity.downstream import GraphSlicer, leaf_tensors
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

__all__ = ["ActivationReuse", "CACHE_REFERENCES"]

CACHE_REFERENCES: tuple[str, ...] = ("nearest", "base")
_SERVED_STATES = (FakeQuantState.FLOAT, FakeQuantState.VALIDATION)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (``-0.0 != 0.0``, equal NaNs equal), with equal dtype, shape, strides and device."""
    if (a.dtype, a.shape, a.stride(), a.device) != (b.dtype, b.shape, b.stride(), b.device):
        return False
    if a.is_floating_point():
        if a.element_size() not in _BITS:
            return False
        a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
    elif a.is_complex():
        return False
    return bool(torch.equal(a, b))


_PLAIN = (int, float, bool, str, type(None))


def _clone_inputs(value: Any) -> Any:
    """Copy the tensors of a call's inputs; ``None`` marks inputs that cannot be matched."""
    if isinstance(value, Tensor):
        return None if value.requires_grad else value.detach().clone(memory_format=torch.preserve_format)
    if type(value) in (tuple, list):  # subclasses (named tuples) are not matched
        items = [_clone_inputs(v) for v in value]
        ok = all(c is not None or v is None for c, v in zip(items, value, strict=True))
        return type(value)(items) if ok else None
    if type(value) is dict:
        items = {k: _clone_inputs(v) for k, v in value.items()}
        ok = all(items[k] is not None or value[k] is None for k in value)
        return items if ok and all(isinstance(k, str) for k in value) else None
    return value if isinstance(value, _PLAIN) else None


def _same_inputs(kept: Any, value: Any) -> bool:
    if isinstance(kept, Tensor) or isinstance(value, Tensor):
        return isinstance(kept, Tensor) and isinstance(value, Tensor) and _same_bits(kept, value)
    if type(kept) is not type(value):
        return False
    if isinstance(kept, (tuple, list)):
        return len(kept) == len(value) and all(_same_inputs(a, b) for a, b in zip(kept, value, strict=True))
    if isinstance(kept, dict):
        return kept.keys() == value.keys() and all(_same_inputs(kept[k], value[k]) for k in kept)
    return kept == value


def _node_key(fq: FakeQuantize) -> tuple:
    """Return what a quant node's forward depends on in FLOAT/VALIDATION (scale tensors cloned)."""
    learned = fq._parameters.get("scale_param")
    return (
        fq.state,
        fq.dtype.name,
        fq.is_fixed,
        fq.scale_mode,
        fq._buffers["scale"].detach().clone(),
        None if learned is None else learned.detach().clone(),
    )


def _same_key(a: tuple, b: tuple) -> bool:
    if a[:4] != b[:4] or not _same_bits(a[4], b[4]):
        return False
    if a[5] is None or b[5] is None:
        return a[5] is None and b[5] is None
    return _same_bits(a[5], b[5])


def _versions(value: Any) -> tuple[int, ...]:
    return tuple(t._version for t in leaf_tensors(value))


def _rng_states() -> list[Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.extend(torch.cuda.get_rng_state_all())
    return states


@dataclass
class _Run:
    """One forward call of a probe, kept: its inputs, every node's value and the state it ran under."""

    inputs: Any
    values: dict[Node, Any]
    quant: dict[FakeQuantize, tuple]
    params: tuple[int, ...]
    switches: tuple[bool, bool]
    versions: dict[Node, tuple[int, ...]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)  # id of each kept storage base -> bytes


class ActivationReuse:
    """Serves a ``GraphModule``'s forward during search probes from kept runs (module docstring).

    Args:
        model: the searched model (reuse is off unless it is a ``torch.fx.GraphModule``).
        budget_mb: most megabytes of kept activations (tensors shared between runs counted once).
        reference: ``nearest`` (any kept run, fewest nodes to execute) or ``base`` (the first run).
    """

    def __init__(self, model: nn.Module, budget_mb: float, reference: str = "nearest") -> None:
        if reference not in CACHE_REFERENCES:
            raise ValueError(f"unknown cache reference {reference!r}; allowed: {', '.join(CACHE_REFERENCES)}")
        self.model, self.budget, self.reference = model, budget_mb * 2**20, reference
        self.off: str | None = None
        self.counts = {"served": 0, "recorded": 0, "forward": 0, "executed": 0, "nodes": 0}
        self.runs: list[list[_Run]] = []  # per call index
        self.order: list[_Run] = []  # every kept run, oldest first
        self.kept: dict[int, list[int]] = {}  # storage base id -> [runs holding it, bytes]
        self._calls = 0
        if not isinstance(model, fx.GraphModule):
            self.off = "the model is not an fx GraphModule"
            return
        self.slicer = GraphSlicer(model)
        self.quant = [m for m in model.modules() if isinstance(m, FakeQuantize)]
        self.starts = {
            fq: self.slicer.start_nodes_of([fq]) for fq in self.quant
        }  # every call of a shared one
        quant_ids = {id(m) for m in self.quant}
        owned = [(m, t) for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())]
        self.tensors = [t for m, t in owned if t is not None and id(m) not in quant_ids]
        self.model_ids = {id(t) for _, t in owned}

    # ------------------------------------------------------------------ serving
    @contextmanager
    def serving(self) -> Iterator[None]:
        """Serve the model's forward for one probe's ``eval_fn`` call (no-op when reuse is off)."""
        if self.off is not None or "forward" in self.model.__dict__:
            yield
            return
        self._calls = 0
        self.model.forward = self._forward
        try:
            yield
        finally:
            del self.model.forward

    def _real(self, args: tuple, kwargs: dict) -> Any:
        self.counts["forward"] += 1
        return type(self.model).forward(self.model, *args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        index, self._calls = self._calls, self._calls + 1
        if (args and kwargs) or self.off is not None or not self._servable():
            return self._real(args, kwargs)
        inputs = kwargs if kwargs else args
        kept = _clone_inputs(inputs)
        if kept is None:
            return self._real(args, kwargs)
        with ExitStack() as stack:
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.no_grad())
            return self._run(index, inputs, kept)

    def _servable(self) -> bool:
        if torch.is_grad_enabled() or any(m.training for m in self.model.modules()):
            return False
        return all(fq.state in _SERVED_STATES for fq in self.quant)

    def _run(self, index: int, inputs: Any, kept: Any) -> Any:
        run = _Run(
            kept,
            {},
            {fq: _node_key(fq) for fq in self.quant},
            tuple(t._version for t in self.tensors),
            (GlobalFakeQuantSwitch._enabled, FakeCastSwitch._enabled),
        )
        while len(self.runs) <= index:
            self.runs.append([])
        ref, starts = self._reference(index, inputs, run)
        self.counts["nodes"] += len(self.slicer.nodes)
        if ref is None:
            rng = _rng_states()
            cache = self.slicer.cache(inputs, record_index=False)
            if not self.slicer.safe:
                self.off = f"in-place ops mutate activations ({', '.join(self.slicer.mutated[:3])})"
            elif any(not torch.equal(a, b) for a, b in zip(rng, _rng_states(), strict=True)):
                self.off = "the graph draws random numbers"
            self.counts["recorded"] += 1
            self.counts["executed"] += len(self.slicer.nodes)
            run.values, out = cache.values, cache.output
        else:
            base = {**ref.values, **self.slicer.bind(inputs)}
            local = self.slicer.run_nodes(base, starts)
            self.counts["served"] += 1
            self.counts["executed"] += len(local)
            run.values = {**base, **local}
            out = map_arg(
                self.slicer.output_node.args[0], lambda n: local[n] if n in local else _fresh(base[n])
            )
        if self.off is None and (self.reference == "nearest" or not self.runs[index]):
            self._keep(index, run)
        return out

    def _reference(self, index: int, inputs: Any, now: _Run) -> tuple[_Run | None, list[Node]]:
        """Return the kept run to start from and the start nodes (``None``: run the whole graph)."""
        best: tuple[int, _Run | None, list[Node]] = (len(self.slicer.nodes) + 1, None, [])
        for run in list(self.runs[index]):
            moved = any(_versions(run.values[n]) != v for n, v in run.versions.items())
            if moved or run.params != now.params:
                self._drop(run)  # a kept tensor or a model weight changed in place
                continue
            if run.switches != now.switches or not _same_inputs(run.inputs, inputs):
                continue
            changed = [fq for fq in self.quant if not _same_key(now.quant[fq], run.quant[fq])]
            if any(not self.starts[fq] for fq in changed):
                continue
            starts = list({n: None for fq in changed for n in self.starts[fq]})
            size = len(self.slicer.downstream(starts)) if starts else 0
            if size < best[0]:
                best = (size, run, starts)
        return best[1], best[2]

    # ------------------------------------------------------------------ kept runs and the budget
    def _keep(self, index: int, run: _Run) -> None:
        run.values = {n: v for n, v in run.values.items() if n.op != "placeholder"}
        tensors = [t for v in run.values.values() for t in leaf_tensors(v)]
        if any(t.is_inference() for t in tensors):
            return  # no version counter: a later change could not be seen
        run.versions = {n: _versions(v) for n, v in run.values.items()}
        for t in tensors:
            base = t._base if t._base is not None else t
            if id(base) not in self.model_ids:
                run.sizes[id(base)] = base.nelement() * base.element_size()
        for key, size in run.sizes.items():
            self.kept.setdefault(key, [0, size])[0] += 1
        self.runs[index].append(run)
        self.order.append(run)
        while sum(size for _, size in self.kept.values()) > self.budget:
            oldest = self.order[0]
            self._drop(oldest)
            if oldest is run:
                self.off = f"kept activations exceed the cache budget ({self.budget / 2**20:g} MB)"
                return

    def _drop(self, run: _Run) -> None:
        for runs in self.runs:
            if run in runs:
                runs.remove(run)
        self.order.remove(run)
        for key in run.sizes:
            self.kept[key][0] -= 1
            if self.kept[key][0] == 0:
                del self.kept[key]

    def note(self) -> str:
        """One line on what the reuse did during the search (for the plan's notes)."""
        c = self.counts
        if self.off is not None and not (c["served"] or c["recorded"]):
            return f"activation reuse off: {self.off}"
        share = c["executed"] / c["nodes"] if c["nodes"] else 1.0
        text = (
            f"activation reuse ({self.reference}): {c['served']} probe forwards ran only downstream of the "
            f"changed ops, {c['recorded']} ran node by node, {c['forward']} ran the real forward; "
            f"{share:.0%} of graph nodes executed"
        )
        return text + (f"; stopped: {self.off}" if self.off is not None else "")


def _fresh(value: Any) -> Any:
    """Copy a kept value handed to the caller as model output, so the caller cannot alter kept runs."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value
