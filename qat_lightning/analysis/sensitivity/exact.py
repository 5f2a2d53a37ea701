"""Quantization sensitivity (the seed's "Calculating Quantization Sensitivity"), exact method.

For every op and sensitive type, only that op's quant node(s) are enabled (``VALIDATION``), every other
node is ``FLOAT``, and the model output is compared with the all-float output using the bad-case
inputs:

* ``activation``: the op's output node, and for gemm ops its input nodes too (nodes whose dtype is
  ``float32`` quantize nothing and are left out; an op with no quantizing node has no row);
* ``weight``: the op's weight node (gemm ops).

Partial quantization: a node in state ``FLOAT`` when the targets are listed (the user left it
unquantized, e.g. ``fake_quant_disabled(model.head)`` kept open or ``fq.state = FLOAT``) quantizes nothing
in the model under analysis, so it is left out like a ``float32`` node: an op whose nodes of a type are all
FLOAT has no row of that type (it is not listed at all, rather than listed with no value), and the search
never raises it. The other rows are measured exactly as without the FLOAT nodes (every probe runs the
rest of the model in float anyway). This holds for both methods (the approximate one takes these targets).

On an fx ``GraphModule`` the float run is cached once and each probe re-runs only the nodes downstream
of every call that uses an enabled node (:mod:`qat_lightning.analysis.sensitivity.downstream`); eager models
(or graphs that mutate cached tensors in place) run one full forward per probe. Both give the same numbers.
Index ops are replayed from the float run (:mod:`qat_lightning.analysis.compare.index_ops`).

Shared modules: a row measures its quant *nodes*, wherever they run. The call sites of one module (``fc``
and ``fc#1`` of an ``nn.Linear`` called twice) share its weight node, so enabling ``fc``'s weight row
quantizes the weight in both calls, and the rows ``fc / weight`` and ``fc#1 / weight`` measure the same node:
they carry the same value (measured once), the error of that node over the whole model. Each op keeps its
row (op names are what templates and the search take), so a shared node appears once per op that uses it.

One :class:`SensitivityTable` per model output, rows most sensitive first. ``metric`` holds an error
value (larger = worse): the metric itself for error metrics, ``1 - cosine`` for COSINE (named
``1-COSINE``), ``-SQNR`` for SQNR.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from qat_lightning.analysis.compare.index_ops import IndexRecorder, IndexReplayer
from qat_lightning.analysis.compare.metrics import Metric, error_name, error_value, whole
from qat_lightning.analysis.inputs import ModelInputs, call_model, flatten_outputs
from qat_lightning.analysis.sensitivity.downstream import FloatCache, GraphSlicer
from qat_lightning.analysis.state import analysis_mode
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, fake_quant_disabled
from qat_lightning.quant.ops import OpInfo, OpKind, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES, SensitivityRow, SensitivityTable

__all__ = ["SensitivityTarget", "sensitivity_targets", "exact_sensitivity", "build_tables", "check_types"]


@dataclass(frozen=True)
class SensitivityTarget:
    """One row to measure: an op, a sensitive type, and the quant nodes that type enables."""

    op_name: str
    module_path: str
    sensitive_type: str
    op_type: str
    nodes: tuple[FakeQuantize, ...]
    quant_dtype: str
    flops: int


def check_types(types: str | Iterable[str]) -> tuple[str, ...]:
    """Validate sensitive types (``activation``, ``weight``)."""
    items = (types,) if isinstance(types, str) else tuple(types)
    bad = [t for t in items if t not in SENSITIVE_TYPES]
    if bad or not items:
        raise ValueError(f"unknown sensitive types {bad or items}; allowed: {', '.join(SENSITIVE_TYPES)}")
    return items


def _quantizing(node: FakeQuantize | None) -> bool:
    """Whether ``node`` quantizes in the analysed model: a dtype other than float32, not left in FLOAT."""
    return node is not None and not node.dtype.is_float32 and node.state is not FakeQuantState.FLOAT


def sensitivity_targets(model: nn.Module, types: Iterable[str] = SENSITIVE_TYPES) -> list[SensitivityTarget]:
    """List the rows to measure, in graph order (ops of ``iter_quant_ops``, then type order).

    Call it on the model as it is analysed: nodes in FLOAT now (partial quantization) are left out
    (module docstring), so inside ``fake_quant_disabled(model)`` there is nothing to list.
    """
    types = check_types(types)
    paths = {id(m): p for p, m in model.named_modules()}
    targets: list[SensitivityTarget] = []
    for name, op in iter_quant_ops(model):
        info: OpInfo = op.op_info
        nodes = quant_nodes_of(op)
        inputs = [n for k, n in nodes.items() if k.startswith("input.") and _quantizing(n)]
        output = nodes.get("output")
        weight = nodes.get("weight")
        for kind in types:
            if kind == "activation":
                chosen = inputs + ([output] if _quantizing(output) else [])
                if info.kind is OpKind.GEMM and inputs:
                    dtype = inputs[0].dtype
                elif _quantizing(output):
                    dtype = output.dtype
                else:
                    dtype = chosen[0].dtype if chosen else None
            else:
                chosen = [weight] if _quantizing(weight) else []
                dtype = weight.dtype if chosen else None
            if chosen:
                targets.append(
                    SensitivityTarget(
                        name,
                        paths.get(id(op), name),
                        kind,
                        info.op_type,
                        tuple(chosen),
                        str(dtype),
                        int(info.flops),
                    )
                )
    if not targets:
        _warn_all_float(model)
    return targets


def _warn_all_float(model: nn.Module) -> None:
    """Warn when no row is left because every integer quant node of ``model`` is in FLOAT."""
    nodes = [n for _, op in iter_quant_ops(model) for n in quant_nodes_of(op).values() if n is not None]
    if any(not n.dtype.is_float32 for n in nodes) and all(n.state is FakeQuantState.FLOAT for n in nodes):
        warnings.warn(
            "every quant node of the model is in FLOAT (fake quant disabled), so nothing is quantized and "
            "there is no sensitivity row; analyse the model in VALIDATION (outside fake_quant_disabled)",
            stacklevel=3,
        )


def _output_metrics(metric: Metric, ref: list, out: object) -> dict[str, float]:
    got = dict(flatten_outputs(out))
    values: dict[str, float] = {}
    for name, base in ref:
        analy = got.get(name)
        if analy is None or not base.is_floating_point():
            continue
        values[name] = error_value(metric, whole(metric, base, analy))
    return values


def exact_sensitivity(
    model: nn.Module,
    inputs: ModelInputs,
    metric: Metric,
    targets: Sequence[SensitivityTarget],
    use_slice: bool = True,
) -> dict[SensitivityTarget, dict[str, float]]:
    """Measure every target exactly (see the module docstring).

    Args:
        model: the calibrated prepared model.
        inputs: the bad-case inputs (one batch).
        metric: the metric comparing each output with the float output.
        targets: from :func:`sensitivity_targets`.
        use_slice: run only the downstream part of an fx graph (``False``: one full forward per target,
            the naive sweep).

    Returns:
        ``{target: {output name: error value}}``.
    """
    results: dict[SensitivityTarget, dict[str, float]] = {}
    with analysis_mode(model), fake_quant_disabled(model), torch.no_grad():
        slicer = GraphSlicer(model) if use_slice and isinstance(model, fx.GraphModule) else None
        cache = None
        if slicer is not None:
            cache = slicer.cache(inputs)
            if not slicer.safe:
                warnings.warn(
                    f"in-place ops mutate cached activations ({', '.join(slicer.mutated[:5])}); sensitivity "
                    "falls back to one full forward per op",
                    stacklevel=2,
                )
                slicer = None
        if slicer is not None:
            ref = flatten_outputs(cache.output)
            records = [r for n in slicer.nodes for r in cache.index_records.get(n, [])]
        else:
            recorder = IndexRecorder()
            with recorder:
                ref = flatten_outputs(call_model(model, inputs))
            records = recorder.records
        measured: dict[tuple[int, ...], dict[str, float]] = {}  # targets sharing their nodes: once
        for target in targets:
            key = tuple(id(n) for n in target.nodes)
            if key not in measured:
                out = _run_enabled(model, inputs, target.nodes, slicer, cache, records)
                measured[key] = _output_metrics(metric, ref, out)
            results[target] = dict(measured[key])
    return results


def _run_enabled(
    model: nn.Module,
    inputs: ModelInputs,
    nodes: tuple[FakeQuantize, ...],
    slicer: GraphSlicer | None,
    cache: FloatCache | None,
    records: list,
) -> object:
    """Return the model output with only ``nodes`` enabled.

    With a slicer, every call of every module holding one of the nodes is re-run with what follows it (a
    shared weight node: all call sites of the module); otherwise one full forward.
    """
    for node in nodes:
        node.state = FakeQuantState.VALIDATION
    try:
        starts = slicer.start_nodes_of(nodes) if slicer is not None and cache is not None else []
        if starts:
            return slicer.run_downstream(cache, starts, _output_only(slicer, nodes, starts, cache))
        with IndexReplayer(records) if records else nullcontext():
            return call_model(model, inputs)
    finally:
        for node in nodes:
            node.state = FakeQuantState.FLOAT


def _output_only(
    slicer: GraphSlicer, nodes: tuple[FakeQuantize, ...], starts: list, cache: FloatCache
) -> dict | None:
    """Return the new values when only an output node is enabled: ``q(cached float output)`` per call.

    Used when the one enabled node is the output node of the module of every start node. The output node
    is the last thing an op module applies (ops.py contract), and in FLOAT it passes the op's result
    through, so the cached value is exactly what the enabled node would quantize.
    """
    if len(nodes) != 1 or any(n.op != "call_module" for n in starts):
        return None
    (out_node,) = nodes
    if any(
        getattr(slicer.gm.get_submodule(str(n.target)), "output_quant", None) is not out_node for n in starts
    ):
        return None
    values = [cache.values[n] for n in starts]
    if not all(isinstance(v, Tensor) and v.is_floating_point() for v in values):
        return None
    with torch.no_grad():
        return {n: out_node(v) for n, v in zip(starts, values, strict=True)}


def build_tables(
    results: dict[SensitivityTarget, dict[str, float]],
    metric: Metric,
    method: str,
    all_flops: int | None = None,
) -> list[SensitivityTable]:
    """One table per model output, rows sorted most sensitive first (NaN first, ties in graph order).

    A quant node shared by several ops (the weight of ``fc`` and ``fc#1``) has one row per op, all with the
    node's value (the module docstring), so its rows sit together.

    Args:
        results: ``{target: {output name: error value}}``.
        metric: the metric used (gives the column name).
        method: ``exact`` or ``approximate``.
        all_flops: total FLOPs for the share column (default: sum over the distinct ops measured).
    """
    if all_flops is None:
        seen: dict[str, int] = {}
        for target in results:
            seen[target.op_name] = target.flops
        all_flops = sum(seen.values())
    names: list[str] = []
    for values in results.values():
        names.extend(n for n in values if n not in names)
    tables = []
    for out_name in names:
        rows = []
        for order, (target, values) in enumerate(results.items()):
            if out_name not in values:
                continue
            value = values[out_name]
            row = SensitivityRow(
                op_name=target.op_name,
                sensitive_type=target.sensitive_type,
                op_type=target.op_type,
                metric=value,
                quant_dtype=target.quant_dtype,
                flops=target.flops,
                flops_share=target.flops / all_flops if all_flops else 0.0,
            )
            key = math.inf if math.isnan(value) else value
            rows.append((-key, order, row))
        rows.sort(key=lambda r: (r[0], r[1]))
        tables.append(SensitivityTable(tuple(r[2] for r in rows), error_name(metric), out_name, method))
    return tables
