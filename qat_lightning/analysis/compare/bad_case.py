"""Find bad cases (the seed's "Find Badcase"): the worst sample per model output per metric.

Every batch runs through the float reference and the quantized model (index ops replayed from the float
run, :mod:`qat_lightning.analysis.compare.index_ops`); each output is split along its batch dimension (dim 0)
and every sample is scored with every metric. Sample indices count samples over the whole traversal
(batch ``b`` of size ``B``, position ``i`` → ``b * B + i`` with constant batch sizes). An output whose
dim 0 is not the batch size (a scalar loss, a reduced tensor) cannot be attributed to samples and is
skipped with a warning.

The result holds the seed's three tables:

1. the bad-case index of each output under each metric;
2. the metric value of each of those bad cases;
3. per metric, the worst sample over all outputs: the one whose value is worst across outputs (values
   compared as they are, so outputs on very different scales should be judged with COSINE).

and the inputs of every bad-case sample (batch dimension 1), enough to rerun them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat_lightning.analysis.compare.index_ops import IndexRecorder, IndexReplayer
from qat_lightning.analysis.compare.metrics import Metric, badness, per_sample
from qat_lightning.analysis.inputs import (
    InputFn,
    ModelInputs,
    batch_size_of,
    call_model,
    concat_samples,
    flatten_outputs,
    iter_batches,
    select_samples,
)

__all__ = [
    "BadCaseRow",
    "WorstRow",
    "BadCaseResult",
    "bad_case_payload",
    "find_bad_cases",
    "read_bad_cases",
]


@dataclass(frozen=True)
class BadCaseRow:
    """Tables 1 and 2: the worst sample of one output under one metric, and its value."""

    output_name: str
    metric: str
    index: int
    value: float


@dataclass(frozen=True)
class WorstRow:
    """Table 3: the worst sample over all outputs under one metric."""

    metric: str
    index: int
    output_name: str
    value: float


@dataclass(frozen=True)
class BadCaseResult:
    """What :func:`find_bad_cases` found.

    Attributes:
        metrics: metric names, in order.
        outputs: output names, in order.
        rows: one :class:`BadCaseRow` per (output, metric), output-major.
        worst: one :class:`WorstRow` per metric.
        samples: bad-case sample index → its inputs (batch dimension 1), sorted by index.
        num_samples: how many samples were scored.
        replayed_index_ops: index ops of the quantized run answered with the float indices (per batch sum).
    """

    metrics: tuple[str, ...]
    outputs: tuple[str, ...]
    rows: tuple[BadCaseRow, ...]
    worst: tuple[WorstRow, ...]
    samples: Mapping[int, ModelInputs] = field(default_factory=dict)
    num_samples: int = 0
    replayed_index_ops: int = 0

    def index(self, output_name: str, metric: str) -> int:
        """Return the bad-case index of ``output_name`` under ``metric``."""
        for row in self.rows:
            if row.output_name == output_name and row.metric == metric:
                return row.index
        raise ValueError(
            f"no bad case for output {output_name!r} / metric {metric!r}; "
            f"outputs: {', '.join(self.outputs)}; metrics: {', '.join(self.metrics)}"
        )

    def indices(self) -> tuple[int, ...]:
        """Every distinct bad-case sample index, ascending."""
        return tuple(sorted({r.index for r in self.rows} | {w.index for w in self.worst}))

    def batch(self, indices: Iterable[int] | None = None) -> ModelInputs:
        """Stack the inputs of the given bad cases (default: all) into one batch, in index order."""
        chosen = sorted(self.samples) if indices is None else list(indices)
        missing = [i for i in chosen if i not in self.samples]
        if missing:
            raise ValueError(f"no stored inputs for samples {missing}; stored: {sorted(self.samples)}")
        return concat_samples([self.samples[i] for i in chosen])


def run_pair(float_call: Callable[[], Any], quant_call: Callable[[], Any]) -> tuple[Any, Any, int]:
    """Run the float call (recording index ops) then the quantized call (replaying them)."""
    recorder = IndexRecorder()
    with torch.no_grad():
        with recorder:
            ref = float_call()
        if recorder.records:
            replayer = IndexReplayer(recorder.records)
            with replayer:
                out = quant_call()
            return ref, out, replayer.replayed
        return ref, quant_call(), 0


def find_bad_cases(
    float_model: nn.Module,
    quant_model: nn.Module,
    dataloader: Iterable[Any],
    metrics: tuple[Metric, ...],
    num_steps: int | None = None,
    input_fn: InputFn | None = None,
    float_context: Callable[[], Any] | None = None,
    quant_context: Callable[[], Any] | None = None,
) -> BadCaseResult:
    """Traverse the data and find the worst sample per output per metric (see the module docstring).

    Args:
        float_model: the float reference (may be ``quant_model`` itself with ``float_context`` turning
            its quant nodes off).
        quant_model: the calibrated model, already in its analysis state.
        dataloader: any iterable of batches.
        metrics: resolved metrics.
        num_steps: only the first ``num_steps`` batches.
        input_fn: batch → model inputs (default: :func:`~qat_lightning.analysis.inputs.default_input_fn`).
        float_context: context-manager factory entered around each float call.
        quant_context: context-manager factory entered around each quantized call.

    Raises:
        ValueError: when the data is empty or no output can be split per sample.
    """
    from contextlib import nullcontext

    fctx = float_context or nullcontext
    qctx = quant_context or nullcontext
    best: dict[tuple[str, str], tuple[float, int, float]] = {}  # (out, metric) -> (badness, index, value)
    samples: dict[int, ModelInputs] = {}
    outputs: list[str] = []
    skipped: set[str] = set()
    offset = 0
    replayed = 0

    def float_call(inp: ModelInputs) -> Any:
        with fctx():
            return call_model(float_model, inp)

    def quant_call(inp: ModelInputs) -> Any:
        with qctx():
            return call_model(quant_model, inp)

    for inputs in iter_batches(dataloader, num_steps, input_fn):
        size = batch_size_of(inputs)
        ref, out, n = run_pair(lambda inp=inputs: float_call(inp), lambda inp=inputs: quant_call(inp))
        replayed += n
        got = dict(flatten_outputs(out))
        for name, base in flatten_outputs(ref):
            analy = got.get(name)
            if analy is None or base.dim() == 0 or base.shape[0] != size:
                if name not in skipped:
                    skipped.add(name)
                    warnings.warn(
                        f"output {name!r} has no batch dimension of size {size}; it is not scored per sample",
                        stacklevel=2,
                    )
                continue
            if name not in outputs:
                outputs.append(name)
            for metric in metrics:
                values = per_sample(metric, base, analy)
                bad = badness(metric, values)
                i = int(torch.argmax(bad))
                key = (name, metric.name)
                if key not in best or float(bad[i]) > best[key][0]:
                    best[key] = (float(bad[i]), offset + i, float(values[i]))
                    if offset + i not in samples:
                        samples[offset + i] = select_samples(inputs, i, size)
        offset += size
        needed = {v[1] for v in best.values()}
        for k in [k for k in samples if k not in needed]:
            del samples[k]
    if offset == 0:
        raise ValueError("the dataloader gave no batches")
    if not outputs:
        raise ValueError("no model output has a batch dimension; bad cases are found per sample")
    rows = tuple(
        BadCaseRow(o, m.name, best[(o, m.name)][1], best[(o, m.name)][2]) for o in outputs for m in metrics
    )
    worst = []
    for m in metrics:
        o = max(outputs, key=lambda name, m=m: best[(name, m.name)][0])
        worst.append(WorstRow(m.name, best[(o, m.name)][1], o, best[(o, m.name)][2]))
    return BadCaseResult(
        tuple(m.name for m in metrics),
        tuple(outputs),
        rows,
        tuple(worst),
        dict(sorted(samples.items())),
        offset,
        replayed,
    )


def _fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def bad_case_payload(result: BadCaseResult) -> dict[str, Any]:
    """Return what ``badcase.pt`` holds: the tables as plain dicts and every bad-case sample's inputs."""
    return {
        "rows": [_fields(r) for r in result.rows],
        "worst": [_fields(w) for w in result.worst],
        "metrics": result.metrics,
        "outputs": result.outputs,
        "num_samples": result.num_samples,
        "samples": dict(result.samples),
    }


def read_bad_cases(path: str | os.PathLike[str]) -> BadCaseResult:
    """Read a ``badcase.pt`` written by ``QuantAnalysis.auto_find_bad_case`` (:func:`bad_case_payload`).

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        ValueError: naming ``path`` when the file does not load or does not hold bad cases.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bad-case file {str(path)!r}: call auto_find_bad_case(dataloader) first")
    try:
        data = torch.load(path, weights_only=False)
        return BadCaseResult(
            tuple(data["metrics"]),
            tuple(data["outputs"]),
            tuple(BadCaseRow(**r) for r in data["rows"]),
            tuple(WorstRow(**w) for w in data["worst"]),
            dict(data["samples"]),
            int(data["num_samples"]),
        )
    except Exception as err:  # noqa: BLE001 - any unpickling / shape error means: not our file
        raise ValueError(
            f"{str(path)!r} is not a bad-case file written by auto_find_bad_case "
            f"({type(err).__name__}: {str(err)[:200]})"
        ) from err
