"""Layer-by-layer comparison of the deployed (onnxruntime) model with the fake-quant model.

The "quantized" reference mode of the analysis: every quant point the encodings place in the graph is
read from the graph onnxruntime actually runs (optimized at the deployed level, see
:mod:`~qat_lightning.analysis.ort_sessions`: the integer codes of each quant point, dequantized) and
compared with the fake-quant node's output on the same batch, paired by the encodings' node names (a node
traced ``k`` times is paired call by call). Rows come in graph order, so the first row that disagrees is
where deployment and fake quant part, the way ``compare_per_layer`` finds where float and calibration part.

Per row: cosine, max abs error, the error in quantization steps (``max |err| / scale``; 0 = bit-exact,
1 = a rounding tie or accumulation-order flip, more = a real mismatch) and the share of values that differ.

A point whose input comes from a float16 cast (a ``Cast(float16)`` → ``Cast(float32)`` pair upstream, through
ops that only move or select values: reshape, flatten, transpose, slice, concat, ReLU, max pooling, ...) is
also allowed one float16 ulp of its ``|max|`` (``fp16_steps``): torch and onnxruntime compute the value
before the cast in float32, and a value within float32 noise of a float16 rounding boundary rounds to
neighbouring float16 values, one float16 ulp apart. Behind an int16 point that is one ulp of the upstream
value, i.e. up to ``2^-10 * 32767``, about 32 int16 steps, without anything being wrong (the j6p recipe:
gemms int16, everything else float16). A wrong scale or dtype moves a point by far more (a 1.5x scale: a
third of the range) and is still flagged.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qat_lightning.analysis.export_check import onnx_feeds
from qat_lightning.analysis.export_noise import (
    float32_noise_steps,
    fp16_fed_tensors,
    fp16_ulp,
    record_outputs,
)
from qat_lightning.analysis.inputs import InputFn, iter_batches, map_tensors
from qat_lightning.analysis.ort_sessions import check_optimization, ort_session
from qat_lightning.quant import FakeQuantState, fake_quant_state, iter_fake_quantize
from qat_lightning.quant.export.restore import eval_restoring

__all__ = [
    "ExportLayerComparison",
    "ExportLayerRow",
    "compare_export_per_layer",
    "export_layers_csv",
    "export_layers_text",
    "first_export_mismatch",
    "render_export_layers",
]


@dataclass(frozen=True)
class ExportLayerRow:
    """One quant point: onnxruntime's dequantized tensor vs the fake-quant node's output.

    Attributes:
        node: the quant node's module path.
        op_name: the op it belongs to (per-layer table name).
        role: ``input.<i>``, ``weight`` or ``output``.
        dtype: ``qint8`` / ``qint16``.
        onnx_tensor: the graph tensor compared.
        cosine: cosine similarity over the compared batches.
        max_abs_error: largest ``|onnx - fake quant|``.
        max_steps: ``max_abs_error / scale`` (per-channel: the largest over channels).
        mismatch_share: share of values that differ at all.
        noise_steps: the float32 noise floor (``max |fq32 - fq64| / scale``, see
            :mod:`~qat_lightning.analysis.export_noise`); twice this is allowed on top of ``max_steps``.
        fp16_steps: for a point fed by a float16 cast, one float16 ulp of the point's ``|max|`` in steps
            (allowed on top; see the module docstring), else 0.
    """

    node: str
    op_name: str
    role: str
    dtype: str
    onnx_tensor: str
    cosine: float
    max_abs_error: float
    max_steps: float
    mismatch_share: float
    noise_steps: float = 0.0
    fp16_steps: float = 0.0


@dataclass(frozen=True)
class ExportLayerComparison:
    """``QuantAnalysis(..., reference="onnxruntime").compare_per_layer()``: every quant point, graph order.

    Attributes:
        onnx_path: the exported file compared.
        rows: one row per compared graph tensor (see :func:`compare_export_per_layer`).
        max_steps: error (in quantization steps) above which a point counts as a mismatch.
    """

    onnx_path: str
    rows: tuple[ExportLayerRow, ...]
    max_steps: float = 1.0

    @property
    def first_mismatch(self) -> ExportLayerRow | None:
        """The first row (graph order) beyond ``max_steps``: where deployment and fake quant part."""
        return first_export_mismatch(self.rows, self.max_steps)


def _deployed_graph(onnx_path: Path, optimization: str) -> Any:
    """Return the graph onnxruntime runs at ``optimization`` (its optimized model, read back)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(onnx_path, optimization, optimized_path=optimized)
        return onnx.load(str(optimized))


def _fetch_plan(points: list[Any], onnx_path: Path, optimization: str) -> tuple[Any, dict[str, Any], dict]:
    """Pick, per compared tensor, what to read: the deployed graph's integer codes, float tensor or weight.

    Returns the session on the deployed graph (every picked tensor an output, no further optimization),
    the integer weights by tensor (read from the file: exactly what onnxruntime dequantizes) and
    ``{dequantized tensor name: (fetched name, is integer)}`` for the activations.
    """
    import onnx
    from onnx import numpy_helper

    original = {i.name: i for i in onnx.load(str(onnx_path)).graph.initializer}
    proto = _deployed_graph(onnx_path, optimization)
    produced = {o for n in proto.graph.node for o in n.output}
    weights: dict[str, Any] = {}
    fetch: dict[str, tuple[str, bool]] = {}
    for e in points:
        for t, q in zip(e.onnx_tensors, e.onnx_quantized_tensors, strict=True):
            if e.constant and q in original:
                weights[t] = numpy_helper.to_array(original[q])
            elif q in produced:
                fetch[t] = (q, True)
            elif t in produced:
                fetch[t] = (t, False)
    present = {o.name for o in proto.graph.output}
    for name, _ in fetch.values():
        if name not in present:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort_session(proto.SerializeToString(), "disabled"), weights, fetch


def _dequantize(codes: Any, scale: Tensor, axis: int | None) -> Tensor:
    values = torch.from_numpy(np.asarray(codes).astype(np.float64))
    if axis is None:
        return (values * scale.double().reshape(-1)[0]).float()
    shape = [1] * values.dim()
    shape[axis] = -1
    return (values * scale.double().reshape(shape)).float()


class _Pair:
    def __init__(self) -> None:
        self.dot = self.a2 = self.b2 = 0.0
        self.max_err = self.max_steps = self.amax = 0.0
        self.min_scale = math.inf
        self.diff = self.numel = 0

    def add(self, ref: Tensor, got: Tensor, scale: Tensor, axis: int | None) -> None:
        r, g = ref.double(), got.double()
        err = (g - r).abs()
        self.dot += float((r * g).sum())
        self.a2 += float((r * r).sum())
        self.b2 += float((g * g).sum())
        self.max_err = max(self.max_err, float(err.max()) if err.numel() else 0.0)
        self.amax = max(self.amax, float(r.abs().max()) if r.numel() else 0.0)
        self.min_scale = min(self.min_scale, float(scale.min()))
        if axis is None:
            steps = err / float(scale.reshape(-1)[0])
        else:
            shape = [1] * err.dim()
            shape[axis] = -1
            steps = err / scale.double().reshape(shape)
        self.max_steps = max(self.max_steps, float(steps.max()) if steps.numel() else 0.0)
        self.diff += int((err > 0).sum())
        self.numel += err.numel()

    def cosine(self) -> float:
        denom = (self.a2 * self.b2) ** 0.5
        return self.dot / denom if denom > 0 else 1.0

    def fp16_ulp_steps(self) -> float:
        """One float16 ulp of the reference's ``|max|``, in steps of the (smallest) scale."""
        return fp16_ulp(self.amax) / self.min_scale if self.min_scale < math.inf else 0.0


def _deployed_values(weights: dict[str, Any], fetch: dict[str, tuple[str, bool]], got: dict[str, Any]) -> Any:
    """``(tensor, scale, axis) -> deployed float value`` (``None`` for a tensor that was not read)."""

    def value(t: str, scale: Tensor, axis: int | None) -> Tensor | None:
        if t in weights:
            return _dequantize(weights[t], scale, axis)
        if t not in fetch:
            return None
        name, integer = fetch[t]
        raw = got[name]
        return _dequantize(raw, scale, axis) if integer else torch.from_numpy(np.asarray(raw)).float()

    return value


def _add_batch(
    points: list[Any],
    seen: dict[str, list[Tensor]],
    nodes: dict[str, Any],
    pairs: dict[str, _Pair],
    value: Any,
) -> None:
    """Pair one batch's fake-quant outputs (call by call) with the deployed values."""
    for e in points:
        calls = seen.get(e.node, [])
        if len(calls) != len(e.onnx_tensors):
            raise ValueError(
                f"{e.node}: {len(calls)} call(s) in the model, {len(e.onnx_tensors)} in the graph"
            )
        scale = nodes[e.node].scale.detach().float().cpu()
        for ref, t in zip(calls, e.onnx_tensors, strict=True):
            got = value(t, scale, e.axis)
            if got is not None:
                pairs[t].add(ref, got, scale, e.axis)


def compare_export_per_layer(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    dataloader: Iterable[Any],
    *,
    input_fn: InputFn | None = None,
    num_batches: int | None = 1,
    optimization: str = "all",
) -> tuple[ExportLayerRow, ...]:
    """Compare every integer quant point of the exported graph with the fake-quant model, in graph order.

    onnxruntime first optimizes the graph at ``optimization`` (as a deployed session does: fused integer
    kernels, int32 biases); the points are then read from that optimized graph, so making them outputs
    does not stop a fusion. An activation is read as its integer codes (the ``QuantizeLinear`` output or
    the fused kernel that replaced it) times its scale; a weight as its integer initializer times its
    scale; a point whose tensors the optimizer removed is left out.

    Args:
        model: the prepared model that was exported (run in VALIDATION; its states are restored).
        onnx_path: the file ``export_onnx`` wrote (its ``.encodings.json`` names the points).
        dataloader: any iterable of batches.
        input_fn: batch -> model inputs.
        num_batches: batches to compare (``None``: all).
        optimization: onnxruntime graph optimization level, see ``ORT_OPTIMIZATIONS`` (``"disabled"``:
            the QDQ graph run op by op in float32, fake quant's own arithmetic).

    Raises:
        ValueError: without an encodings file, when the graph and the model disagree on a point's calls, or
            for an unknown ``optimization``.
    """
    from qat_lightning.quant.export import read_encodings

    path = Path(onnx_path)
    enc_file = path.with_suffix(".encodings.json")
    if not enc_file.is_file():
        raise ValueError(f"no encodings file {enc_file}: export the model with export_onnx first")
    check_optimization(optimization)
    points = [e for e in read_encodings(enc_file) if e.dtype in ("qint8", "qint16") and e.onnx_tensors]
    session, weights, fetch = _fetch_plan(points, path, optimization)
    nodes = dict(iter_fake_quantize(model))
    pairs = {t: _Pair() for t in [*weights, *fetch]}
    names = [name for name, _ in fetch.values()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen, handles = record_outputs(model, {e.node for e in points})
    try:
        with eval_restoring(model), fake_quant_state(model, FakeQuantState.VALIDATION), torch.no_grad():
            for inputs in iter_batches(dataloader, num_batches, input_fn):
                feeds = onnx_feeds(session, inputs)
                seen.clear()
                on_device = map_tensors(inputs, lambda t: t.to(device))
                model(**on_device) if isinstance(on_device, dict) else model(*on_device)
                got = dict(zip(names, session.run(names, feeds), strict=True)) if names else {}
                _add_batch(points, seen, nodes, pairs, _deployed_values(weights, fetch, got))
    finally:
        for h in handles:
            h.remove()
    noise = float32_noise_steps(
        model, dataloader, {e.node for e in points}, input_fn=input_fn, num_batches=num_batches
    )
    return _rows(points, pairs, noise, path)


def _rows(
    points: list[Any], pairs: dict[str, _Pair], noise: dict[str, list[float]], path: Path
) -> tuple[ExportLayerRow, ...]:
    """One row per compared tensor, in the graph's order."""
    fp16_fed = fp16_fed_tensors(path)
    rows = [
        ExportLayerRow(
            e.node,
            e.op_name,
            e.role,
            e.dtype,
            t,
            pairs[t].cosine(),
            pairs[t].max_err,
            pairs[t].max_steps,
            pairs[t].diff / max(pairs[t].numel, 1),
            noise.get(e.node, [])[k] if k < len(noise.get(e.node, [])) else 0.0,
            pairs[t].fp16_ulp_steps() if t in fp16_fed else 0.0,
        )
        for e in points
        for k, t in enumerate(e.onnx_tensors)
        if t in pairs
    ]
    order = {t: i for i, t in enumerate(_graph_order(path))}
    return tuple(sorted(rows, key=lambda r: order.get(r.onnx_tensor, len(order))))


def _graph_order(path: Path) -> list[str]:
    import onnx

    return [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]


STEP_SLACK = 1e-3
"""Steps of float32 slack: a one-step rounding flip measures ``1.000002`` steps on dequantized int8 values."""

_QMAX = {"qint8": 127, "qint16": 32767}


def step_tolerance(row: ExportLayerRow, max_steps: float = 1.0) -> float:
    """Return the error (in steps) a row may show: ``max_steps`` + twice its float32 noise floor + slack.

    Twice: torch and onnxruntime each compute in float32 and each may sit ``noise_steps`` from the exact
    (float64) result, on opposite sides. The slack covers float32 rounding of the dequantized values
    themselves (``2**-24`` of a value up to ``qmax`` steps, on both sides): 0.004 steps for int16. A point
    fed by a float16 cast may also show one float16 ulp of its ``|max|`` (``fp16_steps``, see the module
    docstring): the upstream float16 value rounded to its neighbour.
    """
    qmax = _QMAX.get(row.dtype, 127)
    return max_steps + 2.0 * row.noise_steps + row.fp16_steps + STEP_SLACK + qmax * 2.0**-22


def first_export_mismatch(rows: Iterable[ExportLayerRow], max_steps: float = 1.0) -> ExportLayerRow | None:
    """Return the first row (graph order) whose error exceeds :func:`step_tolerance`."""
    return next((r for r in rows if r.max_steps > step_tolerance(r, max_steps)), None)


def render_export_layers(rows: Iterable[ExportLayerRow]) -> str:
    """Render the rows as a fixed-width table (``compare_export_per_layer.txt``)."""
    lines = [
        f"{'op_name':<28}{'role':<9}{'dtype':<8}{'cosine':>10}{'max_abs_err':>13}{'max_steps':>10}"
        f"{'noise':>8}{'fp16':>8}{'differ':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.op_name or r.node:<28}{r.role:<9}{r.dtype:<8}{r.cosine:>10.6f}{r.max_abs_error:>13.4g}"
            f"{r.max_steps:>10.2f}{r.noise_steps:>8.2f}{r.fp16_steps:>8.2f}{100 * r.mismatch_share:>7.2f}%"
        )
    return "\n".join(lines) + "\n"


def export_layers_text(comparison: ExportLayerComparison) -> str:
    """Render ``compare_export_per_layer.txt``: the verdict (first mismatch or none), then the table."""
    bad = comparison.first_mismatch
    if bad is None:
        head = (
            f"onnxruntime vs fake quant: every quant point within {comparison.max_steps:g} step(s) "
            "+ 2x its float32 noise floor (column noise: fake quant float32 vs float64) + one float16 ulp "
            "where a float16 cast feeds it (column fp16)"
        )
    else:
        head = (
            f"onnxruntime vs fake quant: first mismatch at {bad.op_name or bad.node} ({bad.role}, "
            f"node {bad.node}, tensor {bad.onnx_tensor}): {bad.max_steps:.2f} steps (float32 noise "
            f"{bad.noise_steps:.2f}, float16 ulp {bad.fp16_steps:.2f}), cosine {bad.cosine:.6f}"
        )
    return f"{head}\nfile: {comparison.onnx_path}\n\n" + render_export_layers(comparison.rows)


def export_layers_csv(rows: Iterable[ExportLayerRow]) -> str:
    """Render the rows as CSV (one row per compared tensor, graph order, full precision)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [f.name for f in fields(ExportLayerRow)]
    writer.writerow(["index", *names])
    writer.writerows([i, *(getattr(r, n) for n in names)] for i, r in enumerate(rows))
    return out.getvalue()
