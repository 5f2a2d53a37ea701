"""Record per-op summaries while the float reference and the quantized model run op-aligned.

:func:`record_layers` (the seed's ``qa.run()``) runs both models with
:class:`~qat_lightning.analysis.compare.lockstep.Lockstep` over some batches and keeps, per op, streaming
summaries (:class:`~qat_lightning.analysis.compare.stats.PairStats` of the op's float vs quantized output and
:class:`~qat_lightning.analysis.compare.stats.ClipStats` of the op's own quant node), never whole tensors.

The quant node that defines an op's ``quant_dtype``/``qscale`` and whose error is split into clipping and
rounding is the op's output node when it quantizes to an integer dtype, else its first integer input
node. Op outputs that are not tensors are not compared. In eager prepared models an op module that
dispatches to another call-site module (``name#k``) is recorded under the module that ran the call
(the innermost op module). Index ops are replayed in lockstep (the quantized thread waits for the
float thread's k-th index result).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from qat_lightning.analysis.compare.alignment import Alignment, align_ops
from qat_lightning.analysis.compare.index_ops import IndexRecorder, IndexReplayer
from qat_lightning.analysis.compare.lockstep import Lockstep
from qat_lightning.analysis.compare.stats import ClipStats, Moments, PairStats
from qat_lightning.analysis.inputs import ModelInputs, call_model
from qat_lightning.analysis.state import analysis_mode, eval_mode
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize
from qat_lightning.quant.ops import iter_quant_ops, quant_nodes_of

__all__ = ["OpRecord", "record_layers"]


@dataclass
class OpRecord:
    """Running summaries of one op (mutable while :func:`record_layers` runs)."""

    name: str
    op_type: str
    analy_type: str
    base_type: str
    node: FakeQuantize | None
    aligned: bool = True
    node_is_output: bool = False
    pair: PairStats = field(default_factory=PairStats)
    analy_only: Moments = field(default_factory=Moments)
    clip: ClipStats = field(default_factory=ClipStats)
    shape: tuple[int, ...] = ()
    reason: str = ""


def _report_node(op: nn.Module) -> tuple[FakeQuantize | None, bool]:
    nodes = quant_nodes_of(op)
    out = nodes.get("output")
    if out is not None and out.dtype.is_integer:
        return out, True
    for key, node in nodes.items():
        if key.startswith("input.") and node.dtype.is_integer:
            return node, False
    if out is not None and not out.dtype.is_float32:
        return out, True
    return None, False


_ABSENT = object()
_FORWARD_ATTRS = ("_qat_forward_depth", "_qat_forward_overlap")


class _RoleState:
    """The eager dispatch state of one model, one copy per lockstep role (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.slots: list[tuple[dict, str]] = []
        for mod in model.modules():
            if "_calls" in mod.__dict__:
                self.slots.append((mod.__dict__, "_calls"))
            if "_qat_dispatchers" in mod.__dict__:
                self.slots += [(mod.__dict__, attr) for attr in _FORWARD_ATTRS]
        self.saved = self._get()
        self.by_role: dict[str, list] = {}
        self.current: str | None = None

    def _get(self) -> list:
        return [d.get(key, _ABSENT) for d, key in self.slots]

    def _set(self, values: list) -> None:
        for (d, key), value in zip(self.slots, values, strict=True):
            if value is _ABSENT:
                d.pop(key, None)
            else:
                d[key] = value

    def switch(self, role: str) -> None:
        """Put away the running role's state and bring in ``role``'s (the state before the run at first)."""
        if role == self.current:
            return
        if self.current is not None:
            self.by_role[self.current] = self._get()
        self._set(self.by_role.get(role, self.saved))
        self.current = role

    def restore(self) -> None:
        """Put back the state from before the run."""
        self._set(self.saved)
        self.current = None


class _Hooks:
    """Forward hooks recording op outputs for both roles of a :class:`Lockstep` run."""

    def __init__(self, lock: Lockstep, records: dict[str, OpRecord], order: list[str]) -> None:
        self.lock = lock
        self.records = records
        self.order = order
        self.local = threading.local()
        self.handles: list = []

    def _state(self) -> threading.local:
        loc = self.local
        if not hasattr(loc, "stack"):
            loc.stack, loc.calls = [], {}
        return loc

    def watch(self, module: nn.Module, role: str, name_of: dict[int, str]) -> None:
        """Publish (ref) or compare (quant) the c-th call of ``module`` as op ``name_of[c]``."""

        def pre(mod: nn.Module, args: tuple) -> None:
            if self.lock.role == role:
                self._state().stack.append([False])

        def post(mod: nn.Module, args: tuple, out: object) -> None:
            if self.lock.role != role:
                return
            loc = self._state()
            had_child = loc.stack.pop()[0]
            if loc.stack:
                loc.stack[-1][0] = True
            if had_child:
                return
            count = loc.calls.get(id(mod), 0)
            loc.calls[id(mod)] = count + 1
            name = name_of.get(count, name_of.get(-1))
            if name is not None and isinstance(out, Tensor):
                self._record(role, name, out)

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def _record(self, role: str, name: str, out: Tensor) -> None:
        key = (name, self._count(name))
        if role == "ref":
            self.lock.put(key, out.detach().clone())
            return
        rec = self.records[name]
        if name not in self.order:
            self.order.append(name)
        rec.shape = tuple(out.shape)
        ref = self.lock.take(key) if rec.aligned else None
        if ref is not None and ref.shape == out.shape:
            rec.pair.update(ref, out)
        else:
            if ref is not None:
                rec.aligned = False
                rec.reason = f"float output shape {tuple(ref.shape)} != quantized {tuple(out.shape)}"
            rec.analy_only.update(out)

    def _count(self, name: str) -> int:
        loc = self._state()
        key = ("name", name)
        count = loc.calls.get(key, 0)
        loc.calls[key] = count + 1
        return count

    def watch_inputs(self, model: nn.Module, inputs: dict[str, str]) -> None:
        """Publish the float model's arguments as the reference of the model-input ops (``x_quant``)."""
        signature = inspect.signature(model.forward)

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.lock.role != "ref":
                return
            bound = signature.bind_partial(*args, **kwargs).arguments
            for op_name, arg in inputs.items():
                value = bound.get(arg)
                if isinstance(value, Tensor) and value.is_floating_point():
                    self._record("ref", op_name, value)

        self.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))

    def watch_clip(self, node: FakeQuantize, rec: OpRecord) -> None:
        """Split the op's report-node error into clipping and rounding (quantized role)."""

        def post(mod: FakeQuantize, args: tuple, out: object) -> None:
            if self.lock.role != "quant" or mod.state is not FakeQuantState.VALIDATION:
                return
            dtype = mod.dtype
            x = args[0]
            if dtype.is_integer and isinstance(x, Tensor) and isinstance(out, Tensor):
                rec.clip.update(x, out, mod.scale, dtype.qmin, dtype.qmax, mod.ch_axis)

        self.handles.append(node.register_forward_hook(post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def record_layers(
    quant_model: nn.Module,
    batches: Iterable[ModelInputs],
    float_model: nn.Module | None = None,
    records: dict[str, OpRecord] | None = None,
) -> tuple[dict[str, OpRecord], list[str]]:
    """Run both models op-aligned on every batch and accumulate per-op summaries.

    Args:
        quant_model: the calibrated prepared model.
        batches: model inputs, one batch each.
        float_model: the original float model, or ``None`` to use ``quant_model`` with quant nodes FLOAT.
        records: summaries to continue (from an earlier call), or ``None``.

    Returns:
        ``(records by op name, op names in the order the quantized model ran them)``.
    """
    ops = list(iter_quant_ops(quant_model))
    alignment = align_ops(quant_model, float_model) if float_model is not None else None
    float_modules = dict(float_model.named_modules()) if float_model is not None else {}
    if records is None:
        records = _new_records(ops, alignment, float_modules)
    order: list[str] = []
    for inputs in batches:
        with analysis_mode(quant_model), eval_mode(*([float_model] if float_model is not None else [])):
            saved = [(node, node.state) for _, node in iter_fake_quantize(quant_model)]

            single = float_model is None
            roles = _RoleState(quant_model) if single else None

            def to_float(saved: list = saved, roles: _RoleState | None = roles) -> None:
                if roles is not None:
                    roles.switch("ref")
                for node, _ in saved:
                    node.state = FakeQuantState.FLOAT

            def to_quant(saved: list = saved, roles: _RoleState | None = roles) -> None:
                if roles is not None:
                    roles.switch("quant")
                for node, state in saved:
                    node.state = state

            lock = Lockstep(on_ref=to_float if single else None, on_quant=to_quant if single else None)
            hooks = _Hooks(lock, records, order)
            try:
                for name, op in ops:
                    hooks.watch(op, "quant", {-1: name})
                    if records[name].node is not None:
                        hooks.watch_clip(records[name].node, records[name])
                if single:
                    for name, op in ops:
                        hooks.watch(op, "ref", {-1: name})
                else:
                    by_path: dict[str, dict[int, str]] = {}
                    for name, (path, call) in alignment.matched.items():  # type: ignore[union-attr]
                        by_path.setdefault(path, {})[call] = name
                    for path, names in by_path.items():
                        hooks.watch(float_modules[path], "ref", names)
                    if alignment.inputs:  # type: ignore[union-attr]
                        hooks.watch_inputs(float_model, alignment.inputs)  # type: ignore[union-attr,arg-type]
                _run_pair(lock, quant_model if single else float_model, quant_model, inputs)
            finally:
                hooks.remove()
                to_quant()
                if roles is not None:
                    roles.restore()
    return records, order


def _new_records(
    ops: list[tuple[str, nn.Module]], alignment: Alignment | None, float_modules: dict[str, nn.Module]
) -> dict[str, OpRecord]:
    records = {}
    for name, op in ops:
        base_type = op.op_info.op_type
        aligned, reason = True, ""
        if alignment is not None:
            if name in alignment.matched:
                base_type = type(float_modules[alignment.matched[name][0]]).__name__
            elif name in alignment.inputs:
                base_type = "input"
            else:
                aligned, reason = False, alignment.unmatched[name]
        node, is_output = _report_node(op)
        records[name] = OpRecord(
            name, op.op_info.op_type, type(op).__name__, base_type, node, aligned, is_output, reason=reason
        )
    return records


def _run_pair(lock: Lockstep, ref_model: nn.Module, quant_model: nn.Module, inputs: ModelInputs) -> None:
    recorder = IndexRecorder()

    def wait_for(k: int) -> None:
        lock.wait_until(lambda: len(recorder.records) > k)

    def ref_call() -> object:
        with recorder:
            return call_model(ref_model, inputs)

    def quant_call() -> object:
        with IndexReplayer(recorder.records, wait_for):
            return call_model(quant_model, inputs)

    lock.run(ref_call, quant_call)
