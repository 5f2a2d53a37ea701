"""Dual-int16 diagnosis (the seed's "Two scenarios in which the all-int16 model fail").

From the activation and weight sensitivity tables:

* an op **highly sensitive under both** types "needs int16 on both inputs". On j6e / j6m gemm ops cannot
  take int16 on activation and weight at once, so the seed's remedies apply: make one side more
  quantization-friendly in the float model (raise weight decay to narrow the weights; add a normalization
  op before the gemm to narrow its input). On a chip with double int16 (j6p) the finding is a ready
  template line instead.
* an op highly sensitive under **only one** type is "generally due to plugin usage issues or certain
  operators requiring fixed scale settings": the finding lists that op's range facts (observer min/max vs
  the representable ``scale * qmax``) so a clipped or wasted range shows at a glance.

"Highly sensitive" (per table): the row is among the ``topk`` most sensitive rows of its type, its
*badness* (:func:`row_badness`: its error on a scale where 0 is no error) is positive and at least
``rel_threshold`` x the table's largest badness, and its metric is at least ``min_metric``.

Rows hold error values, larger = worse, whatever the metric's direction (the sensitivity producer stores
lower-is-better metrics as they are, ``1 - cos`` for COSINE and the negated value for other
higher-is-better metrics). The badness is the stored value itself for error metrics and ``1-COSINE``
(unchanged from the raw rule), the noise-to-signal power ratio ``10 ** (value / 10)`` for ``-SQNR`` rows
(``-SQNR`` dB; proportional to ``1 - cos`` for small noise, so an SQNR table flags what the COSINE table
of the same model flags), and, for another negated metric (``-NAME``: higher-is-better, no known zero),
the distance above the table's least sensitive row. ``min_metric`` is in the table's stored units (an
``-SQNR`` floor of ``-30`` keeps rows with SQNR <= 30 dB).

``min_metric`` defaults per metric (:data:`DEFAULT_MIN_METRIC`: COSINE rows hold ``1 - cos``, so 1e-3
means cos < 0.999; ``-SQNR`` rows the same noise level, SQNR < 27 dB); tables of metrics without a default
(L1, ATOL: no absolute scale) are used only when ``min_metric`` is given or no table has a default, so a
healthy model is not flagged just because some op ranks first.

Plain torch: no lightning, no hydra.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import iter_quant_ops, quant_nodes_of
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

__all__ = [
    "DEFAULT_MIN_METRIC",
    "DualInt16Diagnosis",
    "Int16Finding",
    "NodeRange",
    "diagnose_dual_int16",
    "node_ranges",
    "render_dual_int16",
    "row_badness",
]

DEFAULT_MIN_METRIC: Mapping[str, float] = {
    "1-COSINE": 1e-3,
    "COSINE": 1e-3,
    "-SQNR": 10.0 * math.log10(2e-3),
}
"""Absolute floor of a "highly sensitive" row per metric (COSINE rows hold ``1 - cos``; ``-SQNR`` rows
``-SQNR`` dB: ``1 - cos = 1e-3`` is a noise-to-signal power of ``2e-3`` for small uncorrelated noise, about
SQNR 27 dB)."""

_DUAL_REMEDY = (
    "needs int16 on both inputs (activation and weight), which {chip} lacks for gemm ops. The seed's "
    "remedies: make one side quantization-friendly in the float model, then re-run the float training "
    "and calibration: raise weight decay (narrower weights, e.g. x10) and/or add a normalization op "
    "(BatchNorm/LayerNorm) before this op (narrower input); meanwhile give the more sensitive side int16"
)


@dataclass(frozen=True)
class NodeRange:
    """Range facts of one quant node.

    Attributes:
        node: ``input.0``, ``weight`` or ``output``.
        dtype: the node's dtype.
        observed_min: observer's running minimum (over channels for per-channel nodes).
        observed_max: observer's running maximum.
        representable: ``scale * qmax`` (largest over channels; ``nan`` for float nodes).
        fixed: whether the scale is pinned.
        channel_spread: per-channel nodes: largest / median channel ``max|x|`` (1.0 per tensor).
    """

    node: str
    dtype: str
    observed_min: float
    observed_max: float
    representable: float
    fixed: bool = False
    channel_spread: float = 1.0

    @property
    def abs_max(self) -> float:
        """``max(|min|, |max|)`` observed."""
        return max(abs(self.observed_min), abs(self.observed_max))

    @property
    def coverage(self) -> float:
        """``abs_max / representable``: > 1 clips, << 1 wastes the grid (``nan`` when not integer)."""
        if not math.isfinite(self.representable) or self.representable <= 0:
            return math.nan
        return self.abs_max / self.representable

    def describe(self) -> str:
        """One line: ``input.0 int8: observed [-3.1, 250], scale*qmax 250 (coverage 1.00)``."""
        text = f"{self.node} {self.dtype}: observed [{self.observed_min:.4g}, {self.observed_max:.4g}]"
        if math.isfinite(self.representable):
            text += f", scale*qmax {self.representable:.4g} (coverage {self.coverage:.2f}"
            if self.coverage > 1.01:
                text += ": values beyond it are clipped"
            elif self.coverage < 0.5:
                text += ": most of the grid unused"
            text += ")"
        if self.fixed:
            text += ", fixed scale"
        if self.channel_spread > 1.0:
            text += f", channel spread {self.channel_spread:.3g}x"
        return text


def _node_range(key: str, node: FakeQuantize) -> NodeRange:
    obs = node.observer
    lo, hi = obs.min_val.detach().float(), obs.max_val.detach().float()
    amax = torch.maximum(lo.abs(), hi.abs())
    spread = 1.0
    if amax.numel() > 1 and bool(torch.isfinite(amax).all()):
        median = float(amax.median())
        spread = float(amax.max()) / median if median > 0 else math.inf
    dtype = node.dtype
    representable = float(node.scale.detach().float().max()) * dtype.qmax if dtype.is_integer else math.nan
    return NodeRange(
        key,
        str(dtype),
        float(lo.min()) if lo.numel() else math.nan,
        float(hi.max()) if hi.numel() else math.nan,
        representable,
        node.is_fixed,
        spread,
    )


def node_ranges(model: nn.Module) -> dict[str, tuple[NodeRange, ...]]:
    """Return every quantized op's range facts: ``op name -> (NodeRange per quant node, ...)``."""
    return {
        name: tuple(_node_range(key, node) for key, node in quant_nodes_of(op).items())
        for name, op in iter_quant_ops(model)
    }


@dataclass(frozen=True)
class Int16Finding:
    """One op the diagnosis flags.

    Attributes:
        op_name: the op (as in the sensitivity table and templates).
        op_type: its short type.
        kind: ``dual`` (both types), ``activation_only`` or ``weight_only``.
        activation_metric: its activation row's metric (``nan`` when absent).
        weight_metric: its weight row's metric (``nan`` when absent).
        metric_name: the table's metric.
        output_name: the table's output.
        table_max: the table's largest metric (for scale).
        ranges: the op's range facts (empty without a model).
        advice: what to do, in words (with a template line where one applies).
    """

    op_name: str
    op_type: str
    kind: str
    activation_metric: float
    weight_metric: float
    metric_name: str
    output_name: str
    table_max: float
    ranges: tuple[NodeRange, ...] = ()
    advice: str = ""


@dataclass(frozen=True)
class DualInt16Diagnosis:
    """The diagnosis of a set of sensitivity tables.

    Attributes:
        chip: the target chip (``None``: j6e/j6m rules assumed).
        double_int16: whether the chip's gemm ops take int16 on both inputs.
        findings: dual findings first, then single-type ones, each most sensitive first.
        criteria: how "highly sensitive" was decided, in words.
    """

    chip: str | None
    double_int16: bool
    findings: tuple[Int16Finding, ...]
    criteria: str

    @property
    def dual(self) -> tuple[Int16Finding, ...]:
        """Ops that need int16 on both inputs."""
        return tuple(f for f in self.findings if f.kind == "dual")

    @property
    def single(self) -> tuple[Int16Finding, ...]:
        """Ops sensitive under one type only."""
        return tuple(f for f in self.findings if f.kind != "dual")


def row_badness(metric_name: str, value: float, least: float = 0.0) -> float:
    """Return a row's error on a scale where 0 is no error and ratios are meaningful (module docstring).

    Args:
        metric_name: the table's metric (``L1``, ``1-COSINE``, ``-SQNR``, ``-NAME`` for a negated one).
        value: the row's stored error value (larger = worse).
        least: the table's smallest finite stored value (the reference of a ``-NAME`` metric).

    Returns:
        ``value`` for error metrics, ``10 ** (value / 10)`` for ``-SQNR``, ``value - least`` for another
        negated metric.
    """
    if metric_name.upper() == "-SQNR":
        return 10.0 ** (value / 10.0) if value < 3000 else math.inf
    if metric_name.startswith("-"):
        return value - least
    return value


def _high_rows(table: SensitivityTable, floor: float, rel: float, topk: int) -> dict[str, dict[str, float]]:
    """``op -> {type: metric}`` of the highly sensitive rows of one table."""
    finite = [r.metric for r in table.rows if math.isfinite(r.metric)]
    least = min(finite, default=0.0)
    top = max((row_badness(table.metric_name, v, least) for v in finite), default=0.0)
    high: dict[str, dict[str, float]] = {}
    seen: dict[str, int] = {}
    for row in table.rows:  # most sensitive first
        rank = seen.get(row.sensitive_type, 0)
        seen[row.sensitive_type] = rank + 1
        if rank >= topk or not math.isfinite(row.metric) or row.metric < floor:
            continue
        badness = row_badness(table.metric_name, row.metric, least)
        if badness > 0 and badness >= rel * top:
            high.setdefault(row.op_name, {})[row.sensitive_type] = row.metric
    return high


def _single_advice(kind: str, ranges: tuple[NodeRange, ...]) -> str:
    side = "activation" if kind == "activation_only" else "weight"
    bad = [r for r in ranges if (r.node == "weight") == (side == "weight") and r.coverage == r.coverage]
    off = [r for r in bad if r.coverage > 1.01 or r.coverage < 0.5 or r.channel_spread > 8]
    text = (
        f"sensitive under {side} only: int16 on one input would do; the seed says this is generally a "
        "configuration (plugin usage) issue or an op needing a fixed scale"
    )
    if off:
        text += "; suspicious range: " + "; ".join(r.describe() for r in off)
    elif side == "activation":
        text += "; if the input is a known-range value (coordinates, angles, masks) give it a fixed scale"
    return text


def _advice(op: str, kind: str, facts: tuple[NodeRange, ...], double: bool, chip: str | None) -> str:
    """Return what to do about a finding of ``kind`` (a template line where the chip has double int16)."""
    if kind != "dual":
        return _single_advice(kind, facts)
    if double:
        return (
            f"set both to int16 (this chip has double int16): "
            f"ModuleNameTemplate({{{op!r}: {{'input_dtype': ql.qint16, 'weight_dtype': ql.qint16}}}})"
        )
    return _DUAL_REMEDY.format(chip=chip or "j6e/j6m")


def diagnose_dual_int16(
    tables: Iterable[SensitivityTable],
    model: nn.Module | None = None,
    chip: str | None = "j6m",
    rel_threshold: float = 0.3,
    topk: int = 10,
    min_metric: float | None = None,
) -> DualInt16Diagnosis:
    """Diagnose which ops need int16 on both inputs and which are sensitive under one type only.

    Args:
        tables: sensitivity tables with both ``activation`` and ``weight`` rows (e.g. of the all-int16 or
            the all-int8 calibration model).
        model: the calibrated model the tables were measured on, for the range facts (optional).
        chip: the target chip name (``j6e``, ``j6m``, ``j6p``); ``None`` assumes j6e/j6m rules.
        rel_threshold: a high row's badness (:func:`row_badness`) is at least this share of its table's
            largest badness.
        topk: a high row is among the ``topk`` most sensitive rows of its type.
        min_metric: absolute floor of a high row's metric, in the table's stored units (``-SQNR`` rows:
            ``-30`` keeps SQNR <= 30 dB); ``None``: :data:`DEFAULT_MIN_METRIC` per metric (see the
            module docstring for tables whose metric has no default).

    Returns:
        The typed diagnosis (render with :func:`render_dual_int16`).

    Raises:
        ValueError: for a threshold outside ``[0, 1]`` or ``topk < 1``.
    """
    if not 0.0 <= rel_threshold <= 1.0:
        raise ValueError(f"rel_threshold must be in [0, 1], got {rel_threshold}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    from qat_lightning.chips import get_chip

    double = bool(get_chip(chip).gemm_double_int16) if chip else False
    tables = list(tables)
    if min_metric is None and any(t.metric_name in DEFAULT_MIN_METRIC for t in tables):
        tables = [t for t in tables if t.metric_name in DEFAULT_MIN_METRIC]
    ranges = node_ranges(model) if model is not None else {}
    found: dict[str, Int16Finding] = {}
    for table in tables:
        floor = min_metric if min_metric is not None else DEFAULT_MIN_METRIC.get(table.metric_name, -math.inf)
        top = max((r.metric for r in table.rows if math.isfinite(r.metric)), default=0.0)
        types = {r.op_name: r.op_type for r in table.rows}
        for op, high in _high_rows(table, floor, rel_threshold, topk).items():
            metrics = {r.sensitive_type: r.metric for r in table.rows if r.op_name == op}
            kind = "dual" if len(high) == 2 else f"{next(iter(high))}_only"
            if op in found and (found[op].kind == "dual" or kind != "dual"):
                continue  # the first table (or a dual verdict) wins
            facts = ranges.get(op, ())
            advice = _advice(op, kind, facts, double, chip)
            found[op] = Int16Finding(
                op,
                types.get(op, "?"),
                kind,
                metrics.get("activation", math.nan),
                metrics.get("weight", math.nan),
                table.metric_name,
                table.output_name,
                top,
                facts,
                advice,
            )
    order = sorted(
        found.values(),
        key=lambda f: (f.kind != "dual", -max(_nz(f.activation_metric), _nz(f.weight_metric))),
    )
    floors = (
        f"min_metric={min_metric:g}"
        if min_metric is not None
        else ", ".join(f"{k} >= {v:g}" for k, v in DEFAULT_MIN_METRIC.items()) + " (others: relative only)"
    )
    criteria = f"top-{topk} of its type, badness >= {rel_threshold:g} x the table's largest, {floors}"
    return DualInt16Diagnosis(chip, double, tuple(order), criteria)


def _nz(value: float) -> float:
    """Return the sort key of a metric: NaN (missing) last; rows hold error values of any sign."""
    return -math.inf if math.isnan(value) else value


def render_dual_int16(diagnosis: DualInt16Diagnosis) -> str:
    """Render the diagnosis as text (the file ``dual_int16.txt``)."""
    chip = diagnosis.chip or "j6e/j6m"
    lines = [
        f"Dual-int16 diagnosis ({chip}; gemm double int16: {'yes' if diagnosis.double_int16 else 'no'})",
        f"highly sensitive = {diagnosis.criteria}",
        "",
    ]
    if not diagnosis.findings:
        lines.append("no op is highly sensitive under activation or weight: nothing to report")
        return "\n".join(lines) + "\n"
    for f in diagnosis.findings:
        lines.append(
            f"{f.op_name} ({f.op_type}) [{f.kind}] {f.metric_name} output {f.output_name}: "
            f"activation {f.activation_metric:.4g}, weight {f.weight_metric:.4g} "
            f"(table max {f.table_max:.4g})"
        )
        lines += [f"    {r.describe()}" for r in f.ranges]
        lines.append(f"    -> {f.advice}")
    return "\n".join(lines) + "\n"
