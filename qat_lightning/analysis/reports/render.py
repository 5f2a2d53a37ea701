"""Rendering of analysis results (text in the seed's layout, CSV, JSON) and atomic file writes.

Computing and rendering are separate: every function here takes a finished result and returns a string
(or writes one). Files are written atomically: to a temporary file in the same directory, then
``os.replace`` onto the final name, so a reader never sees half a report.

JSON: dataclasses become objects; NaN becomes ``null`` and ±inf the strings ``"inf"``/``"-inf"`` (strict
JSON has neither).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from qat_lightning.analysis.compare.bad_case import BadCaseResult
from qat_lightning.analysis.compare.layer_compare import LayerComparison, LayerRow
from qat_lightning.files import write_atomic
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

__all__ = [
    "write_atomic",
    "save_torch_atomic",
    "to_jsonable",
    "to_json",
    "bad_case_text",
    "bad_case_csv",
    "probes_csv",
    "plan_text",
    "layer_text",
    "not_quantized_text",
    "layer_csv",
    "sensitivity_text",
    "sensitivity_csv",
    "safe_filename",
]


def save_torch_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_atomic(path, buffer.getvalue())


def safe_filename(name: str) -> str:
    """Make an output name usable in a file name (``0-1`` stays, ``a/b`` → ``a_b``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "out"


# ---------------------------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """Dataclasses, mappings and sequences → plain JSON values (NaN → None, ±inf → ``"inf"``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.name.startswith("_")
        }
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    return str(obj)


def to_json(obj: Any) -> str:
    """Pretty JSON of :func:`to_jsonable`."""
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- bad cases
def bad_case_text(result: BadCaseResult) -> str:
    """Render the seed's three bad-case tables."""
    metrics = list(result.metrics)
    by_key = {(r.output_name, r.metric): r for r in result.rows}
    index_rows = [[o] + [by_key[(o, m)].index for m in metrics] for o in result.outputs]
    value_rows = [[o] + [by_key[(o, m)].value for m in metrics] for o in result.outputs]
    worst_rows = [[w.metric, w.index] for w in result.worst]
    parts = [
        "The bad case input index of each output:",
        tabulate(index_rows, headers=["Name/Index", *metrics]),
        "",
        "The metric results of each badcase:",
        tabulate(value_rows, headers=["Name/Index", *metrics], floatfmt=".6g"),
        "",
        "The bad case input index of the worst output:",
        tabulate(worst_rows, headers=["metric", "dataloader index"]),
        "",
        f"{result.num_samples} samples compared; {len(result.samples)} bad-case inputs saved"
        + (
            f"; {result.replayed_index_ops} index ops replayed from the float run"
            if result.replayed_index_ops
            else ""
        ),
    ]
    return "\n".join(parts) + "\n"


def bad_case_csv(result: BadCaseResult) -> str:
    """Render tables 1-2 (one row per output and metric) and table 3 (output ``*``) as CSV."""
    rows = [[r.output_name, r.metric, r.index, r.value] for r in result.rows]
    rows += [["*", w.metric, w.index, w.value] for w in result.worst]
    return _csv(["output", "metric", "index", "value"], rows)


# ---------------------------------------------------------------------------------------------- per layer
LAYER_COLUMNS = (
    "mod_name",
    "base_op_type",
    "analy_op_type",
    "shape",
    "quant_dtype",
    "qscale",
    "Cosine",
    "MSE",
    "L1",
    "KL",
    "SQNR",
    "Atol",
    "Rtol",
    "base_model_min",
    "analy_model_min",
    "base_model_max",
    "analy_model_max",
    "base_model_mean",
    "analy_model_mean",
    "base_model_var",
    "analy_model_var",
    "max_atol_diff",
    "max_qscale_diff",
    "clip_share",
    "round_share",
    "clip_ratio",
)


def _layer_values(row: LayerRow) -> list[Any]:
    return [
        row.mod_name,
        row.base_op_type,
        row.analy_op_type,
        "x".join(map(str, row.shape)),
        row.quant_dtype,
        row.qscale,
        row.cosine,
        row.mse,
        row.l1,
        row.kl,
        row.sqnr,
        row.atol,
        row.rtol,
        row.base_model_min,
        row.analy_model_min,
        row.base_model_max,
        row.analy_model_max,
        row.base_model_mean,
        row.analy_model_mean,
        row.base_model_var,
        row.analy_model_var,
        row.max_atol_diff,
        row.max_qscale_diff,
        row.clip_share,
        row.round_share,
        row.clip_ratio,
    ]


def not_quantized_text(float_ops: Sequence[Any], total_flops: int) -> str:
    """Render the ops a prepared model computes in float32 without quant points, with count and share.

    Args:
        float_ops: ``prepared.prepare_record.float_ops`` (``FloatOp``: name, op_type, flops, reason).
        total_flops: FLOPs of the whole model (quantized ops plus ``float_ops``), for the shares.
    """
    flops = sum(op.flops for op in float_ops)
    share = flops / total_flops if total_flops else 0.0
    head = f"Not quantized (float32): {len(float_ops)} op(s), {_flops(flops, share)} FLOPs"
    if not float_ops:
        return head + "\n"
    rows = [
        [
            op.name,
            op.op_type,
            "float32",
            _flops(op.flops, op.flops / total_flops if total_flops else 0.0),
            op.reason,
        ]
        for op in float_ops
    ]
    return head + "\n" + tabulate(rows, headers=["op_name", "op_type", "dtype", "flops", "reason"]) + "\n"


def layer_text(comparison: LayerComparison, float_ops: Sequence[Any] = (), total_flops: int = 0) -> str:
    """Render the per-layer table (seed layout, grid), then the advisor and the unaligned ops.

    ``float_ops`` / ``total_flops``: the model's unquantized ops (see :func:`not_quantized_text`), listed
    last so a partly float model is never shown as fully quantized.
    """
    rows = [[r.index, *_layer_values(r)] for r in comparison.rows]
    parts = [tabulate(rows, headers=["", *LAYER_COLUMNS], tablefmt="psql", floatfmt=".7f"), ""]
    parts.append("Advisor:")
    if comparison.advice:
        parts.append(
            tabulate(
                [[a.op_name, a.kind, a.message] for a in comparison.advice],
                headers=["mod_name", "advice", "detail"],
            )
        )
    else:
        parts.append("  nothing to report")
    if comparison.unaligned:
        parts += ["", "Ops without a float counterpart (quantized statistics only):"]
        parts.append(tabulate(list(comparison.unaligned), headers=["mod_name", "reason"]))
    if comparison.not_run:
        parts += ["", "Ops not called on these inputs: " + ", ".join(comparison.not_run)]
    parts += ["", not_quantized_text(float_ops, total_flops).rstrip("\n")]
    return "\n".join(parts) + "\n"


def layer_csv(comparison: LayerComparison) -> str:
    """Render the per-layer table as CSV (one row per op, full precision)."""
    return _csv(["index", *LAYER_COLUMNS], [[r.index, *_layer_values(r)] for r in comparison.rows])


# ---------------------------------------------------------------------------------------------- sensitivity
def _flops(flops: int, share: float) -> str:
    return f"{flops}({share:.2%})"


def sensitivity_text(table: SensitivityTable, float_ops: Sequence[Any] = (), total_flops: int = 0) -> str:
    """One sensitivity table in the seed's layout (``flops`` shown as ``count(share%)``).

    ``float_ops`` / ``total_flops``: the model's unquantized ops, listed after the table.
    """
    rows = [
        [r.op_name, r.sensitive_type, r.op_type, r.metric, r.quant_dtype, _flops(r.flops, r.flops_share)]
        for r in table.rows
    ]
    header = f"output {table.output_name} ({table.method} sensitivity, {len(table.rows)} rows)"
    body = tabulate(
        rows,
        headers=["op_name", "sensitive_type", "op_type", table.metric_name, "quant_dtype", "flops"],
        floatfmt=".6g",
    )
    return f"{header}\n{body}\n\n{not_quantized_text(float_ops, total_flops)}"


def sensitivity_csv(table: SensitivityTable) -> str:
    """One sensitivity table as CSV."""
    return _csv(
        ["op_name", "sensitive_type", "op_type", table.metric_name, "quant_dtype", "flops", "flops_share"],
        [
            [r.op_name, r.sensitive_type, r.op_type, r.metric, r.quant_dtype, r.flops, r.flops_share]
            for r in table.rows
        ],
    )


# ---------------------------------------------------------------------------------------------- search
def probes_csv(probes: Sequence[Any]) -> str:
    """Render search probes (stage, ratio, counts, raised, metric, cost, ok) as CSV."""
    return _csv(
        ["stage", "ratio", "counts", "raised", "metric", "cost", "ok"],
        [[p.stage, p.ratio, "/".join(map(str, p.counts)), p.raised, p.metric, p.cost, p.ok] for p in probes],
    )


def plan_text(plan: Any) -> str:
    """Render a mixed-precision plan: summary, raised rows and every probe (metric vs ratio vs cost)."""
    status = "reached" if plan.reached else "NOT reached"
    lines = [
        f"target {plan.target:g}: {status}; metric {plan.metric:g}",
        f"{plan.low} -> {plan.high}: common ratio {plan.ratio:.4g}, per-table ratios "
        + ", ".join(f"{r:.4g}" for r in plan.ratios),
        f"estimated cost {plan.cost:.6g} (all {plan.low}: {plan.cost_low:.6g}, "
        f"all raised: {plan.cost_high:.6g})" + (f" on {plan.chip}" if plan.chip else ""),
        "",
        f"raised ({len(plan.raised)}):",
        tabulate([list(r) for r in plan.raised], headers=["op_name", "sensitive_type"])
        if plan.raised
        else "  none",
        "",
        "probes:",
        tabulate(
            [
                [p.stage, p.ratio, "/".join(map(str, p.counts)), p.raised, p.metric, p.cost, p.ok]
                for p in plan.probes
            ],
            headers=["stage", "ratio", "counts", "raised", "metric", "cost", "ok"],
            floatfmt=".6g",
        ),
    ]
    if plan.notes:
        lines += ["", "notes:", *(f"  {n}" for n in plan.notes)]
    return "\n".join(lines) + "\n"
