"""Quantization sensitivity (the seed's "Calculating Quantization Sensitivity"), exact method.

For every op and sensitive type, only that op's quant node(s) are enabled (``VALIDATION``), every other
node is ``FLOAT``, and the model output is compared with the all-float output using the bad-case
inputs:

* ``activation``: the op's output node, and for gemm ops its input nodes too (nodes whose dtype is
  ``float32`` quantize nothing and are left out; an op with no quantizing node has no row);
* ``weight``: the op's weight node (gemm ops).

On an fx ``GraphModule`` the float run is cached once and each probe re-runs only the nodes downstream
of the op (:mod:`qat_lightning.analysis.sensitivity.downstream`); eager models (or graphs that mutate cached
tensors in place) run one full forward per probe. Both give the same numbers. Index ops are replayed from the
float run (:mod:`qat_lightning.analysis.compare.index_ops`).

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
    return node is not None and not node.dtype.is_float32


def sensitivity_targets(model: nn.Module, types: Iterable[str] = SENSITIVE_TYPES) -> list[SensitivityTarget]:
    """List the rows to measure, in graph order (ops of ``iter_quant_ops``, then type order)."""
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
    return targets


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
        for target in targets:
            for node in target.nodes:
                node.state = FakeQuantState.VALIDATION
            try:
                starts = slicer.start_nodes(target.module_path) if slicer is not None else []
                if starts:
                    out = slicer.run_downstream(cache, starts, _output_only(model, target, starts, cache))
                else:
                    with IndexReplayer(records) if records else nullcontext():
                        out = call_model(model, inputs)
            finally:
                for node in target.nodes:
                    node.state = FakeQuantState.FLOAT
            results[target] = _output_metrics(metric, ref, out)
    return results


def _output_only(model: nn.Module, target: SensitivityTarget, starts: list, cache: FloatCache) -> dict | None:
    """Return the op's new values when only its output node is enabled: ``q(cached float output)``.

    The output node is the last thing an op module applies (ops.py contract), and in FLOAT it passes the
    op's result through, so the cached value is exactly what the enabled node would quantize.
    """
    op = model.get_submodule(target.module_path)
    out_node = getattr(op, "output_quant", None)
    if target.nodes != (out_node,) or any(str(n.target) != target.module_path for n in starts):
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
