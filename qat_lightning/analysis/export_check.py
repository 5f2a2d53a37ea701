"""``check_export``: run the exported ONNX model in onnxruntime beside the fake-quant model.

Per output: max abs error, cosine, SQNR (dB) and, for classification outputs (2-D ``(batch, classes)``),
top-1 agreement. The check also proves the graph is really quantized (a ``DequantizeLinear`` for every
integer quant point the encodings place in the graph, a ``Cast`` for every float16 one, and at least one
``DequantizeLinear`` when the model has integer points) and that the encodings' dtypes and scales are still
the model's. ``passed`` is false on any problem or when an output misses ``min_cosine`` / ``min_sqnr_db`` /
``min_top1``; an output below a threshold is listed in ``problems`` too, so a failed check always says why.

onnxruntime runs at the level a user deploys with (``optimization="all"``) and with graph optimizations
off; both are reported, ``passed`` is judged on the chosen level (:mod:`~qat_lightning.analysis.ort_sessions`
says what each level changes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qat_lightning.analysis.checks import check_export_arguments, load_onnx_model
from qat_lightning.analysis.inputs import InputFn, iter_batches, map_tensors
from qat_lightning.analysis.ort_sessions import (
    ORT_LEVEL_CAUSES,
    ORT_OPTIMIZATIONS,
    ort_session,
)
from qat_lightning.analysis.reports import write_atomic
from qat_lightning.quant import FakeQuantState, fake_quant_state, iter_fake_quantize
from qat_lightning.quant.export.restore import eval_restoring
from qat_lightning.quant.outputs import flatten_outputs, graph_output_name

__all__ = [
    "ExportCheck",
    "OutputAgreement",
    "check_export",
    "render_export_check",
    "write_export_check",
]


@dataclass(frozen=True)
class OutputAgreement:
    """onnxruntime vs fake quant for one model output, over all checked batches.

    Attributes:
        name: output name (``0``, ``0-1``, a dict key).
        max_abs_error: largest ``|onnx - fake quant|``.
        cosine: cosine similarity of the flattened outputs.
        sqnr_db: ``10 log10(sum(fq^2) / sum((onnx - fq)^2))`` (``inf`` when identical).
        top1_agreement: share of rows with the same argmax (``None`` when not a classification output).
        numel: number of compared values.
    """

    name: str
    max_abs_error: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    numel: int


@dataclass(frozen=True)
class ExportCheck:
    """Result of :func:`check_export`."""

    onnx_path: str
    num_batches: int
    outputs: tuple[OutputAgreement, ...]
    qdq_nodes: int
    integer_points: int
    problems: tuple[str, ...] = field(default_factory=tuple)
    min_cosine: float = 0.999
    min_top1: float = 0.995
    min_sqnr_db: float = 20.0
    optimization: str = "all"
    unoptimized: tuple[OutputAgreement, ...] = ()

    def meets_thresholds(self, outputs: Sequence[OutputAgreement]) -> bool:
        """Whether every output in ``outputs`` is at or above the thresholds."""
        return not self.threshold_problems(outputs)

    def threshold_problems(self, outputs: Sequence[OutputAgreement]) -> list[str]:
        """One line per output measure below its threshold (NaN is below every threshold)."""
        lines = []
        for o in outputs:
            if not o.cosine >= self.min_cosine:
                lines.append(f"{o.name}: cosine {o.cosine:.6f} is below min_cosine {self.min_cosine:g}")
            if not o.sqnr_db >= self.min_sqnr_db:
                lines.append(
                    f"{o.name}: SQNR {o.sqnr_db:.2f} dB is below min_sqnr_db {self.min_sqnr_db:g} dB"
                )
            if o.top1_agreement is not None and not o.top1_agreement >= self.min_top1:
                lines.append(
                    f"{o.name}: top-1 agreement {o.top1_agreement:.4f} is below min_top1 {self.min_top1:g}"
                )
        return lines

    @property
    def passed(self) -> bool:
        """No problem and every output (at the checked ``optimization`` level) at or above the thresholds."""
        return not self.problems and self.meets_thresholds(self.outputs)

    @property
    def optimization_note(self) -> str | None:
        """Why the optimized session fails where the unoptimized one passes (``None`` otherwise)."""
        if not self.unoptimized or self.meets_thresholds(self.outputs):
            return None
        if not self.meets_thresholds(self.unoptimized):
            return None
        levels = ORT_OPTIMIZATIONS[1 : ORT_OPTIMIZATIONS.index(self.optimization) + 1]
        causes = "; ".join(ORT_LEVEL_CAUSES[lv] for lv in levels if lv in ORT_LEVEL_CAUSES)
        return (
            f"the graph matches fake quant with onnxruntime's optimizations off, not at level "
            f"{self.optimization!r}: onnxruntime's {causes} change the arithmetic; the model amplifies "
            "those one-step differences (see compare_export_per_layer)"
        )


class _Acc:
    """Running sums of one output's comparison."""

    def __init__(self) -> None:
        self.max_abs, self.dot, self.ref2, self.got2, self.err2 = 0.0, 0.0, 0.0, 0.0, 0.0
        self.numel, self.rows, self.agree, self.classification = 0, 0, 0, True

    def add(self, ref: Tensor, got: Tensor) -> None:
        r, g = ref.detach().double().reshape(-1), got.double().reshape(-1)
        err = g - r
        self.max_abs = max(self.max_abs, float(err.abs().max()) if err.numel() else 0.0)
        self.dot += float(r @ g)
        self.ref2 += float(r @ r)
        self.got2 += float(g @ g)
        self.err2 += float(err @ err)
        self.numel += r.numel()
        if ref.dim() == 2 and ref.shape[1] >= 2:
            self.rows += ref.shape[0]
            self.agree += int((ref.argmax(1) == got.argmax(1)).sum())
        else:
            self.classification = False

    def result(self, name: str) -> OutputAgreement:
        denom = math.sqrt(self.ref2 * self.got2)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        sqnr = math.inf if self.err2 == 0 else 10 * math.log10(max(self.ref2, 1e-300) / self.err2)
        top1 = self.agree / self.rows if self.classification and self.rows else None
        return OutputAgreement(name, self.max_abs, cosine, sqnr, top1, self.numel)


def onnx_feeds(session: Any, inputs: Any) -> dict[str, np.ndarray]:
    """Map one batch's model inputs (tuple or dict) onto the session's graph inputs, as numpy arrays."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"the batch has no value for the graph inputs {missing}; graph inputs: {names}")
        return {n: inputs[n].detach().cpu().numpy() for n in names}
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    if len(tensors) != len(names):
        raise ValueError(
            f"the graph takes {len(names)} inputs {names}, the batch gives {len(tensors)} tensors"
        )
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def _pair(ref: dict[str, Tensor], out_names: Sequence[str]) -> list[Tensor]:
    """Pick the model output of each graph output: by name, or by position for a graph named otherwise."""
    if all(n in ref for n in out_names):
        return [ref[n] for n in out_names]
    if len(ref) == len(out_names):
        return list(ref.values())
    raise ValueError(f"graph outputs {list(out_names)} do not match the model's outputs {sorted(ref)}")


def _graph_problems(
    model: nn.Module, proto: Any, encodings: Sequence[Any] | None
) -> tuple[list[str], int, int]:
    graph = proto.graph
    dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    cast_outputs = {n.output[0] for n in graph.node if n.op_type == "Cast"}
    nodes = dict(iter_fake_quantize(model))
    integer = [name for name, n in nodes.items() if n.dtype.is_integer]
    problems = []
    if integer and not dq_outputs:
        problems.append(f"the graph holds no QDQ node but the model has {len(integer)} integer quant points")
    for e in encodings or ():
        node = nodes.get(e.node)
        if node is None:
            problems.append(f"encodings name {e.node!r}, which the model does not have")
            continue
        if node.dtype.name != e.dtype:
            problems.append(f"{e.node}: dtype {node.dtype.name} in the model, {e.dtype} in the export")
            continue
        produced, op = (dq_outputs, "DequantizeLinear") if node.dtype.is_integer else (cast_outputs, "Cast")
        lost = [t for t in e.onnx_tensors if t not in produced]
        if lost:
            problems.append(f"{e.node}: no {op} produces {lost[0]!r} in the graph")
        if node.dtype.is_integer:
            now = node.scale.detach().float().reshape(-1).tolist()
            if len(now) != len(e.scale) or not np.allclose(now, e.scale, rtol=1e-6, atol=0.0):
                problems.append(
                    f"{e.node}: scale changed since the export (model {now[:4]}, export {list(e.scale)[:4]})"
                )
    return problems, len(dq_outputs), len(integer)


def _compare(
    model: nn.Module,
    sessions: dict[str, Any],
    dataloader: Iterable[Any],
    input_fn: InputFn | None,
    num_batches: int | None,
) -> tuple[dict[str, list[OutputAgreement]], int]:
    """Run every session beside the fake-quant model (VALIDATION) on the same batches."""
    first = next(iter(sessions.values()))
    out_names = [o.name for o in first.get_outputs()]
    accs = {level: {n: _Acc() for n in out_names} for level in sessions}
    count = 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_restoring(model):  # each submodule's own flag (a frozen BN) and the switches come back
        with fake_quant_state(model, FakeQuantState.VALIDATION), torch.no_grad():
            for inputs in iter_batches(dataloader, num_batches, input_fn):
                feeds = onnx_feeds(first, inputs)  # first: a batch that does not fit the graph is named
                on_device = map_tensors(inputs, lambda t: t.to(device))
                out = model(**on_device) if isinstance(on_device, dict) else model(*on_device)
                ref = _pair({graph_output_name(k): v for k, v in flatten_outputs(out)}, out_names)
                for level, session in sessions.items():
                    got = session.run(out_names, feeds)
                    for name, expected, value in zip(out_names, ref, got, strict=True):
                        accs[level][name].add(
                            expected.float().cpu(), torch.from_numpy(np.asarray(value)).float()
                        )
                count += 1
    return {level: [acc[n].result(n) for n in out_names] for level, acc in accs.items()}, count


def check_export(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    dataloader: Iterable[Any],
    *,
    input_fn: InputFn | None = None,
    num_batches: int | None = None,
    min_cosine: float = 0.999,
    min_top1: float = 0.995,
    min_sqnr_db: float = 20.0,
    optimization: str = "all",
    out_dir: str | os.PathLike[str] | None = None,
) -> ExportCheck:
    """Compare onnxruntime on ``onnx_path`` with ``model`` (fake quant, VALIDATION) on the same batches.

    Args:
        model: the prepared model that was exported (left in its states and train/eval mode).
        onnx_path: the file written by ``export_onnx`` (its ``.encodings.json`` is read when present).
        dataloader: any iterable of batches.
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).
        num_batches: how many batches (``None``: all).
        min_cosine: per-output cosine an export must reach to pass.
        min_top1: top-1 agreement a classification output must reach to pass.
        min_sqnr_db: per-output SQNR an export must reach to pass (cosine alone misses a wrong magnitude;
            cosine 0.999 is about 27 dB).
        optimization: onnxruntime graph optimization level the check is judged on, one of
            ``ORT_OPTIMIZATIONS`` (default ``"all"``: what a default ``InferenceSession`` deploys). Unless
            ``"disabled"``, an unoptimized session runs too and is reported beside it (``unoptimized``).
        out_dir: where ``export_check.txt`` / ``.json`` go (default: the ONNX file's folder); written
            atomically.

    Returns:
        The check; ``passed`` is false exactly when ``problems`` lists something (an output below a
        threshold is a problem line too).

    Raises:
        ValueError: for a missing file or one that is not an ONNX model, an ``out_dir`` that is a file,
            no batches, batches that do not fit the graph's inputs, an unknown ``optimization``, or a
            threshold out of its range (``min_cosine`` in [-1, 1], ``min_top1`` in [0, 1], ``min_sqnr_db``
            finite), checked before anything runs or is written.
        TypeError: for a threshold that is not a number or a ``num_batches`` that is not an int.
    """
    from qat_lightning.quant.export import read_encodings

    thresholds = {"min_cosine": min_cosine, "min_top1": min_top1, "min_sqnr_db": min_sqnr_db}
    path = check_export_arguments(
        onnx_path, out_dir, {**thresholds, "optimization": optimization}, num_batches
    )
    proto = load_onnx_model(path)
    enc_file = path.with_suffix(".encodings.json")
    encodings = read_encodings(enc_file) if enc_file.is_file() else None
    problems, qdq, integer = _graph_problems(model, proto, encodings)
    if encodings is None:
        problems.append(f"no encodings file {enc_file.name} beside the model")
    levels = [optimization] if optimization == "disabled" else [optimization, "disabled"]
    sessions = {level: ort_session(path, level) for level in levels}
    results, count = _compare(model, sessions, dataloader, input_fn, num_batches)
    if count == 0:
        raise ValueError("the dataloader gave no batch: nothing to check")
    result = ExportCheck(
        onnx_path=str(path),
        num_batches=count,
        outputs=tuple(results[optimization]),
        qdq_nodes=qdq,
        integer_points=integer,
        optimization=optimization,
        unoptimized=tuple(results["disabled"]) if optimization != "disabled" else (),
        **thresholds,
    )
    result = replace(result, problems=(*problems, *result.threshold_problems(result.outputs)))
    write_export_check(result, Path(out_dir) if out_dir is not None else path.parent)
    return result


def render_export_check(check: ExportCheck) -> str:
    """Render the text report (``export_check.txt``)."""
    lines = [
        f"export check: {'PASSED' if check.passed else 'FAILED'} ({check.onnx_path})",
        f"batches: {check.num_batches}; DequantizeLinear nodes: {check.qdq_nodes}; "
        f"integer quant points in the model: {check.integer_points}",
        f"thresholds: cosine >= {check.min_cosine}, SQNR >= {check.min_sqnr_db} dB, "
        f"top-1 agreement >= {check.min_top1}",
        "",
        f"onnxruntime optimization level: {check.optimization} (judged)"
        + ("; optimizations off: reported below" if check.unoptimized else ""),
        "",
        *_output_table(check.outputs),
    ]
    if check.unoptimized:
        lines += ["", "onnxruntime with graph optimizations off (fake quant's float32 arithmetic):"]
        lines += _output_table(check.unoptimized)
    note = check.optimization_note
    if note is not None:
        lines += ["", f"note: {note}"]
    if check.problems:
        lines += ["", "problems:", *(f"  - {p}" for p in check.problems)]
    return "\n".join(lines) + "\n"


def _output_table(outputs: Sequence[OutputAgreement]) -> list[str]:
    lines = [f"{'output':<24}{'max_abs_err':>14}{'cosine':>12}{'sqnr_db':>10}{'top1_agree':>12}"]
    for o in outputs:
        top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement:.4f}"
        lines.append(f"{o.name:<24}{o.max_abs_error:>14.6g}{o.cosine:>12.6f}{o.sqnr_db:>10.2f}{top1:>12}")
    return lines


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_export_check(check: ExportCheck, out_dir: Path) -> tuple[Path, Path]:
    """Write ``export_check.txt`` and ``export_check.json`` into ``out_dir`` (atomically)."""
    doc = asdict(check)
    doc["passed"] = check.passed
    doc["optimization_note"] = check.optimization_note
    for key in ("outputs", "unoptimized"):
        doc[key] = [{k: _json_value(v) for k, v in o.items()} for o in doc[key]]
    txt = write_atomic(out_dir / "export_check.txt", render_export_check(check))
    js = write_atomic(out_dir / "export_check.json", json.dumps(doc, indent=1) + "\n")
    return txt, js
