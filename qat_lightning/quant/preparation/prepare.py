"""``prepare``: turn a float model into a calibration / QAT model with named quant points.

>>> qat_model = prepare(model, example_inputs=x, qconfig_setter=setter, method="auto", check_dir=".")

Steps:

1. validate the arguments; the user's model is never changed (everything works on deep copies);
   each ``nn.MultiheadAttention`` is swapped for its decomposed form (:mod:`.attention_swap`), so its
   projections, matmuls and softmax get quant points on both paths;
2. run a copy of the float model on the example inputs with hooks: call counts of every module (the
   check report's "called times"), the reference output, and the call order (eager mode);
3. ``fx`` / ``auto``: trace with :mod:`.fx_tracer`, fuse, plan and name the ops,
   assign qconfigs with the setter, rewrite the graph (:mod:`.fx_prepare`); the
   traced float graph is first checked against the reference output (same mode, same RNG seed), so a
   wrong trace is an error (``fx``) or a fallback (``auto``), never a silently different model;
4. ``eager`` (or the ``auto`` fallback, with a warning listing what it does not cover): module swapping
   (:mod:`~qat_lightning.quant.preparation.eager_prepare`);
5. attach ``quant_op_order`` (op names in graph order) and ``prepare_record`` (:class:`PrepareRecord`),
   warn about template names that matched no op, and with ``check_dir`` write ``model_check_result.txt``
   (and ``qconfig_changelog.txt`` when the chip rules changed anything).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from qat_lightning.chips import get_chip
from qat_lightning.quant.dtypes import float32
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.nodes.int_bias import set_int_bias
from qat_lightning.quant.nodes.qat_modules import QAT_MODES, QuantOp
from qat_lightning.quant.ops import FloatOp, OpInfo, PrepareRecord
from qat_lightning.quant.preparation.attention_swap import decompose_attention, has_attention
from qat_lightning.quant.preparation.eager_fusion import run_fuse_hook
from qat_lightning.quant.preparation.eager_prepare import prepare_eager, probe_model
from qat_lightning.quant.preparation.fx_prepare import prepare_fx
from qat_lightning.quant.preparation.fx_tracer import FxTraceError
from qat_lightning.quant.preparation.model_check import float_input_gemms
from qat_lightning.quant.preparation.trace_check import check_trace, clone_tree, seeded
from qat_lightning.quant.qconfig.qconfig import QConfig
from qat_lightning.quant.qconfig.setter import QconfigAssignment, as_qconfig_setter

__all__ = ["prepare", "PREPARE_METHODS", "QAT_MODES", "FxTraceError"]

PREPARE_METHODS: tuple[str, ...] = ("fx", "eager", "auto", "jit_strip")
_USER_ATTRS = fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional inputs, or a dict of keyword inputs; "
        f"got {type(example_inputs).__name__}"
    )


def _device_of(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, Tensor):
            return t.device
    return None


def _validate(method: str, qat_mode: str, model: Any, int_bias: Any = True) -> None:
    if not isinstance(int_bias, bool):
        raise TypeError(f"int_bias must be True or False, got {int_bias!r}")
    if method not in PREPARE_METHODS:
        raise ValueError(f"unknown prepare method {method!r}; allowed: {', '.join(PREPARE_METHODS)}")
    if qat_mode not in QAT_MODES:
        raise ValueError(f"unknown qat_mode {qat_mode!r}; allowed: {', '.join(QAT_MODES)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (QuantOp, FakeQuantize)) for m in model.modules()):
        raise ValueError(
            "the model is already prepared (it contains quant nodes); call prepare() on the float model"
        )


@dataclass
class _PathResult:
    """What the fx or the eager path produced, and which method produced it."""

    method: str
    model: nn.Module
    plans: Sequence[Any]
    float_ops: list[FloatOp]
    fused: list[tuple[str, ...]] = field(default_factory=list)
    unfused: list[tuple[str, ...]] = field(default_factory=list)
    not_covered: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _QconfigRecorder:
    """The ``assign`` callable handed to the fx / eager paths: asks the setter, keeps every assignment."""

    def __init__(self, setter: Any) -> None:
        self.setter = setter
        self.assignments: list[QconfigAssignment] = []
        self.failed: list[BaseException] = []

    def __call__(self, ops: Sequence[OpInfo]) -> Mapping[str, QConfig]:
        try:
            assignment = self.setter.assign(ops)
        except Exception as exc:
            self.failed.append(exc)
            raise
        self.assignments.append(assignment)
        return assignment.qconfigs


def prepare(
    model: nn.Module,
    example_inputs: Any,
    qconfig_setter: Any = None,
    method: str = "auto",
    qat_mode: str = "fuse_bn",
    check_dir: str | os.PathLike[str] | None = None,
    fuse_fn: Callable[[nn.Module], Any] | None = None,
    int_bias: bool = True,
) -> nn.Module:
    """Return a copy of ``model`` whose every quantizable op has named quant points.

    Args:
        model: the float model (left unchanged; train/eval mode is kept and decides what fx traces).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs (HF models).
            Every input the model will be called with must be in it (fx makes them the graph's inputs).
        qconfig_setter: a ``QconfigSetter``, a template, a ``QConfig``, a tuple/list of them, or ``None``
            (all int8), see ``qat_lightning.quant.qconfig.setter.as_qconfig_setter``.
        method: ``fx`` (torch.fx tracing: functional ops and operators get quant points too, conv-bn-relu
            and friends are fused), ``jit_strip`` (fx, but only what lies between ``QuantStub`` and
            ``DeQuantStub`` is quantized; the rest is reported as float, off the chip), ``eager`` (module
            swapping plus the user's ``QuantStub`` / ``DeQuantStub``, for code fx cannot trace) or
            ``auto`` (fx, else eager with a warning listing what eager does not cover).
        qat_mode: how fused conv + BN train: ``fuse_bn``, ``with_bn`` or ``freeze_bn`` (see
            ``qat_lightning.quant.nodes.qat_modules.QatConvBn``).
        check_dir: when given, ``model_check_result.txt`` (and ``qconfig_changelog.txt`` if the chip
            rules downgraded anything) is written there.
        fuse_fn: the user's fuse hook, run first on prepare's copy of the model (every method):
            ``fuse_fn(model)`` fuses in place (``qat_lightning.quant.fuse_modules``) or returns the fused
            model. When ``None``, eager mode (also the ``auto`` fallback) calls the model's own
            ``fuse_model()`` method if it has one (torch.ao's eager convention); fx fuses by itself.
        int_bias: in VALIDATION, conv / linear ops with integer input and weight add the bias as deployed
            (int32 at scale ``s_in * s_w``, see ``qat_lightning.quant.nodes.int_bias``); ``False``: float.

    Returns:
        The prepared model (an ``fx.GraphModule`` for fx), with ``quant_op_order`` and
        ``prepare_record`` attributes. Quant nodes start in the QAT state; call
        ``set_fake_quantize(model, "calibration")`` to calibrate.

    Raises:
        ValueError: unknown ``method`` / ``qat_mode``; the model fails on ``example_inputs`` (the model's
            exception is chained); an already prepared model; a chip violation of the setter.
        TypeError: a bad ``model``, ``example_inputs`` or ``qconfig_setter``.
        FxTraceError: ``method="fx"`` and fx cannot trace the model (names the failing line).
    """
    _validate(method, qat_mode, model, int_bias)
    if fuse_fn is not None:
        model = run_fuse_hook(copy.deepcopy(model), fuse_fn)
    swap_notes: list[str] = []
    if has_attention(model):
        if fuse_fn is None:
            model = copy.deepcopy(model)
        swap_notes = decompose_attention(model)
    args, kwargs = _split_inputs(example_inputs)
    setter = as_qconfig_setter(qconfig_setter)
    device = _device_of(model, args, kwargs)
    shadow, probe = _probe_float(model, args, kwargs, device)
    assign = _QconfigRecorder(setter)
    result: _PathResult | None = None
    reason = ""
    if method in ("fx", "auto", "jit_strip"):
        result, reason = _try_fx(method, model, shadow, probe, (args, kwargs, device), assign, qat_mode)
    if result is None:
        result = _run_eager(model, probe, fuse_fn, (args, kwargs, device), assign, qat_mode)
        if method == "auto":
            _warn_fallback(result, reason)
    result.notes = [*swap_notes, *result.notes]
    record = _record(result, probe, qat_mode, setter, assign.assignments[-1])
    prepared = result.model
    set_int_bias(prepared, int_bias)
    order = [p.name for p in result.plans]
    prepared.quant_op_order = order
    prepared.prepare_record = record
    if isinstance(prepared, fx.GraphModule):
        prepared.meta[_USER_ATTRS] = {"quant_op_order": order, "prepare_record": record}
    if check_dir is not None:
        _write_check(prepared, check_dir, record)
    return prepared


def _probe_float(model: nn.Module, args: Any, kwargs: Any, device: Any) -> tuple[nn.Module, Any]:
    """Run a copy of the float model on the example inputs (call counts, reference output)."""
    shadow = copy.deepcopy(model)
    try:
        with seeded(device):
            probe = probe_model(shadow, clone_tree(args), clone_tree(kwargs), record_functions=False)
    except Exception as exc:
        raise ValueError(
            f"prepare: the model fails on example_inputs ({type(exc).__name__}: {exc}); pass inputs the "
            "model accepts (a tuple of positional inputs, or a dict of keyword inputs)"
        ) from exc
    return shadow, probe


def _try_fx(
    method: str,
    model: nn.Module,
    shadow: nn.Module,
    probe: Any,
    inputs: tuple[Any, Any, Any],
    assign: _QconfigRecorder,
    qat_mode: str,
) -> tuple[_PathResult | None, str]:
    """Run the fx path; return ``(None, reason)`` when ``auto`` should fall back to eager, else raise."""
    args, kwargs, device = inputs
    out = probe.output
    output_type = type(out) if isinstance(out, dict) and type(out) is not dict else None
    try:
        result = prepare_fx(
            copy.deepcopy(model),
            shadow,
            clone_tree(args),
            clone_tree(kwargs),
            assign,
            qat_mode,
            device,
            output_type,
            verify=lambda traced: check_trace(traced, probe.output, args, kwargs, device),
            strip=method == "jit_strip",
        )
    except Exception as exc:
        if method != "auto" or assign.failed:
            raise
        reason = str(exc) if isinstance(exc, FxTraceError) else f"{type(exc).__name__}: {exc}"
        assign.assignments.clear()
        return None, reason
    used = "fx" if method != "jit_strip" else method
    return _PathResult(
        used, result.model, result.plans, result.float_ops, result.fused, result.unfused, [], result.notes
    ), ""


def _run_eager(
    model: nn.Module,
    probe: Any,
    fuse_fn: Callable[[nn.Module], Any] | None,
    inputs: tuple[Any, Any, Any],
    assign: _QconfigRecorder,
    qat_mode: str,
) -> _PathResult:
    """Run the eager path (``method="eager"`` or the ``auto`` fallback)."""
    args, kwargs, device = inputs
    eager_model, eager_probe = copy.deepcopy(model), probe
    if fuse_fn is None and callable(getattr(model, "fuse_model", None)):  # torch.ao's eager convention
        eager_model = run_fuse_hook(eager_model, None)
        with seeded(device):
            eager_probe = probe_model(copy.deepcopy(eager_model), clone_tree(args), clone_tree(kwargs), False)
    try:  # the functional ops and the data flow through them: best effort (a TorchFunctionMode)
        with seeded(device):
            full = probe_model(copy.deepcopy(eager_model), clone_tree(args), clone_tree(kwargs))
        functions, flow, error = full.functions, full.flow, None
        if _calls(full) != _calls(eager_probe):
            flow, error = None, "the probe run under a TorchFunctionMode called other modules"
    except Exception as exc:  # noqa: BLE001
        functions, flow, error = [], None, f"the probe run under a TorchFunctionMode failed: {exc!r}"
    result = prepare_eager(
        eager_model,
        _replace_probe(eager_probe, functions, flow, error),
        args,
        kwargs,
        assign,
        qat_mode,
        device,
    )
    return _PathResult(
        "eager",
        result.model,
        result.plans,
        result.float_ops,
        [],
        result.unfused,
        result.not_covered,
        result.notes,
    )


def _warn_fallback(result: _PathResult, reason: str) -> None:
    """Warn (at ``prepare``'s caller) that ``auto`` fell back to eager, and note it in the report."""
    listed = ", ".join(result.not_covered) if result.not_covered else "nothing"
    warnings.warn(
        f"prepare(method='auto'): fx tracing failed, fell back to eager mode.\n{reason}\n"
        f"Not covered in eager mode (functional ops / operators left in float): {listed}",
        stacklevel=3,
    )
    result.notes = [f"fx failed, eager fallback: {reason.splitlines()[0]}", *result.notes]


def _record(
    result: _PathResult, probe: Any, qat_mode: str, setter: Any, assignment: QconfigAssignment
) -> PrepareRecord:
    """Build the :class:`PrepareRecord` (warning about unmatched template names, checking the chip)."""
    if assignment.unmatched:
        warnings.warn(
            f"qconfig templates: these names match no op: {', '.join(assignment.unmatched)}", stacklevel=3
        )
    chip = assignment.chip if assignment.chip is not None else setter.chip
    gemms = [
        FloatOp(i.name, i.op_type, i.flops, "a gemm whose input is float32 (from an op without quant points)")
        for i in float_input_gemms(result.model)
    ]
    notes = [*result.notes, *_float_op_violations([*result.float_ops, *gemms], chip, setter.on_violation)]
    return PrepareRecord(
        method=result.method,
        qat_mode=qat_mode,
        chip=chip,
        call_counts=tuple(probe.call_counts.items()),
        fused=tuple(result.fused),
        unfused=tuple(result.unfused),
        changelog=tuple(assignment.changelog),
        not_covered=tuple(result.not_covered),
        notes=tuple(notes),
        float_ops=tuple(result.float_ops),
    )


def _float_op_violations(float_ops: Sequence[FloatOp], chip: str | None, on_violation: str) -> list[str]:
    """Check the float32 ops against the chip.

    ``error`` raises naming the ops the chip cannot run; ``downgrade`` warns (they have no quant points to
    downgrade) and returns the report notes.
    """
    if chip is None:
        return []
    spec = get_chip(chip)
    bad = [op for op in float_ops if op.on_chip and not spec.allows_output(float32, op.op_type)]
    if not bad:
        return []
    lines = [f"{op.name} ({op.op_type}, {op.flops} FLOPs): float32, {op.reason}" for op in bad]
    text = "\n  ".join(lines)
    rule = f"{spec.name} cannot run these float32 ops (left without quant points, or fed by such an op)"
    if on_violation == "error":
        raise ValueError(
            f"prepare: {rule} ({len(bad)} op(s)):\n  {text}\nmake fx trace the model (method='fx' names "
            "the line it cannot trace), quantize these ops by hand, or pass on_violation='downgrade' to "
            "accept them with a warning"
        )
    warnings.warn(f"prepare: {rule}; they stay float32 ({len(bad)} op(s)):\n  {text}", stacklevel=4)
    return [f"chip violation (not quantized, float32 on {spec.name}): {line}" for line in lines]


def _calls(probe: Any) -> list[tuple[str, int]]:
    return [(e.path, e.call_index) for e in probe.events]


def _replace_probe(probe: Any, functions: list[tuple[str, int, str]], flow: Any, error: str | None) -> Any:
    new = copy.copy(probe)
    new.functions, new.flow, new.flow_error = functions, flow, error
    return new


def _write_check(prepared: nn.Module, check_dir: str | os.PathLike[str], record: PrepareRecord) -> None:
    from qat_lightning.quant.preparation.model_check import (
        CHANGELOG_FILENAME,
        MODEL_CHECK_FILENAME,
        check_model,
        write_changelog,
    )

    os.makedirs(check_dir, exist_ok=True)
    if record.changelog:
        write_changelog(os.path.join(check_dir, CHANGELOG_FILENAME), record.changelog)
    check_model(prepared).write(os.path.join(check_dir, MODEL_CHECK_FILENAME))
