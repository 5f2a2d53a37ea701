"""``QuantAnalysis``: the seed's accuracy-debugging object (bad cases → per-layer → sensitivity).

.. code-block:: python

    qa = QuantAnalysis(calib_model, out_dir="quant_analysis")   # float reference = same model, quant off
    qa = QuantAnalysis(float_model, calib_model, "quant_analysis")  # or the original float model
    qa.auto_find_bad_case(dataloader)      # badcase.txt / badcase.json / badcase.pt
    qa.run()                               # per-op summaries on the bad cases
    qa.compare_per_layer()                 # compare_per_layer.txt / .csv / .json / .png
    tables = qa.sensitivity()              # sensitivity_<output>.txt / .csv / .json / .png, one per output

The calibrated model is evaluated as the seed's "calibration model": ``eval()``, quant nodes in
``VALIDATION`` (nodes a user put in FLOAT stay FLOAT); every state change is undone afterwards. With one
model, the float reference is that model with its quant nodes in FLOAT (names align exactly). With two,
bad cases compare the float model's outputs, the per-layer table aligns ops to float modules where it can
(:mod:`qat_lightning.analysis.compare.alignment`), and sensitivity always uses the prepared model in FLOAT
as the reference (it measures quant nodes, which only the prepared model has).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat_lightning.analysis.compare.bad_case import BadCaseResult, BadCaseRow, WorstRow, find_bad_cases
from qat_lightning.analysis.compare.layer_compare import LayerComparison, compare_layers
from qat_lightning.analysis.compare.layer_record import OpRecord, record_layers
from qat_lightning.analysis.compare.metrics import MetricLike, resolve_metric, resolve_metrics
from qat_lightning.analysis.inputs import InputFn, ModelInputs, iter_batches, normalize_inputs
from qat_lightning.analysis.reports.plots import layer_png, sensitivity_png
from qat_lightning.analysis.reports.render import (
    bad_case_csv,
    bad_case_text,
    layer_csv,
    layer_text,
    safe_filename,
    save_torch_atomic,
    sensitivity_csv,
    sensitivity_text,
    to_json,
    write_atomic,
)
from qat_lightning.analysis.sensitivity.approximate import approximate_sensitivity
from qat_lightning.analysis.sensitivity.exact import (
    build_tables,
    check_types,
    exact_sensitivity,
    sensitivity_targets,
)
from qat_lightning.analysis.state import analysis_mode, eval_mode
from qat_lightning.quant.calibrate import require_calibrated
from qat_lightning.quant.nodes.fake_quantize import fake_quant_disabled
from qat_lightning.quant.ops import iter_quant_ops
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES, SensitivityTable

__all__ = ["QuantAnalysis", "SENSITIVITY_METHODS"]

SENSITIVITY_METHODS = ("exact", "approximate")


class QuantAnalysis:
    """Bad cases, layer-by-layer comparison and sensitivity of a calibrated prepared model.

    Args:
        float_model: the original float model, or — when ``calib_model`` is omitted — the calibrated
            prepared model itself.
        calib_model: the calibrated prepared model (``None``: ``float_model`` is it).
        out_dir: where reports are written (created on first write).
        strict: refuse a model that was never calibrated with one clear error (``False``: warn once).

    Raises:
        ValueError: when the calibrated model has no quantized ops (not a prepared model).
        UncalibratedModelError: when the model was never calibrated (unless ``strict=False``).
    """

    def __init__(
        self,
        float_model: nn.Module,
        calib_model: nn.Module | None = None,
        out_dir: str | os.PathLike = "quant_analysis",
        strict: bool = True,
    ) -> None:
        model = float_model if calib_model is None else calib_model
        if not any(True for _ in iter_quant_ops(model)):
            raise ValueError(
                "the calibrated model has no quantized ops; pass the model returned by prepare()"
            )
        require_calibrated(model, "QuantAnalysis", strict=strict)
        self.model = model
        self.float_model = None if calib_model is None or calib_model is float_model else float_model
        self.out_dir = Path(out_dir)
        self.bad_cases: BadCaseResult | None = None
        self.comparison: LayerComparison | None = None
        self.tables: list[SensitivityTable] = []
        self._records: dict[str, OpRecord] | None = None
        self._order: list[str] = []

    # ------------------------------------------------------------------ bad cases
    def auto_find_bad_case(
        self,
        dataloader: Iterable[Any],
        num_steps: int | None = None,
        metrics: Sequence[MetricLike] = ("COSINE", "L1", "ATOL"),
        input_fn: InputFn | None = None,
    ) -> BadCaseResult:
        """Traverse ``dataloader`` and find the worst sample per output per metric.

        Writes ``badcase.txt`` (the seed's three tables), ``badcase.csv``, ``badcase.json`` and
        ``badcase.pt`` (the tables and every bad-case sample's inputs, see :meth:`load_bad_cases`).

        Args:
            dataloader: any iterable of batches.
            num_steps: only the first ``num_steps`` batches.
            metrics: names among COSINE, L1, ATOL, MSE, SQNR, KL, or callables ``fn(base, analy) -> float``
                (lower = better; wrap in :class:`~qat_lightning.analysis.compare.metrics.Metric` otherwise).
            input_fn: batch → model inputs (default: tensor as is, first element of a tuple, dict as kwargs).
        """
        resolved = resolve_metrics(metrics)
        single = self.float_model is None
        with analysis_mode(self.model), eval_mode(*([] if single else [self.float_model])):
            self.bad_cases = find_bad_cases(
                self.model if single else self.float_model,
                self.model,
                dataloader,
                resolved,
                num_steps=num_steps,
                input_fn=input_fn,
                float_context=(lambda: fake_quant_disabled(self.model)) if single else None,
            )
        self._records = None
        self._write("badcase.txt", bad_case_text(self.bad_cases))
        self._write("badcase.csv", bad_case_csv(self.bad_cases))
        self._write(
            "badcase.json", to_json({k: v for k, v in vars_of(self.bad_cases).items() if k != "samples"})
        )
        save_torch_atomic(
            {
                "rows": [vars_of(r) for r in self.bad_cases.rows],
                "worst": [vars_of(w) for w in self.bad_cases.worst],
                "metrics": self.bad_cases.metrics,
                "outputs": self.bad_cases.outputs,
                "num_samples": self.bad_cases.num_samples,
                "samples": dict(self.bad_cases.samples),
            },
            self.out_dir / "badcase.pt",
        )
        return self.bad_cases

    def load_bad_cases(self, path: str | os.PathLike | None = None) -> BadCaseResult:
        """Load bad cases written by :meth:`auto_find_bad_case` (default ``<out_dir>/badcase.pt``)."""
        data = torch.load(Path(path) if path is not None else self.out_dir / "badcase.pt", weights_only=False)
        self.bad_cases = BadCaseResult(
            tuple(data["metrics"]),
            tuple(data["outputs"]),
            tuple(BadCaseRow(**r) for r in data["rows"]),
            tuple(WorstRow(**w) for w in data["worst"]),
            dict(data["samples"]),
            int(data["num_samples"]),
        )
        self._records = None
        return self.bad_cases

    def bad_case_inputs(self) -> ModelInputs:
        """Every distinct bad-case sample stacked into one batch.

        Raises:
            ValueError: before :meth:`auto_find_bad_case` (or :meth:`load_bad_cases`).
        """
        if self.bad_cases is None:
            raise ValueError("no bad cases yet: call auto_find_bad_case(dataloader) first, or pass inputs")
        return self.bad_cases.batch()

    # ------------------------------------------------------------------ per layer
    def run(
        self,
        dataloader: Iterable[Any] | None = None,
        num_steps: int | None = None,
        input_fn: InputFn | None = None,
    ) -> None:
        """Run the float reference and the calibrated model op-aligned and record per-op summaries.

        Args:
            dataloader: batches to use; default: the bad cases (one batch of all of them).
            num_steps: only the first ``num_steps`` batches of ``dataloader``.
            input_fn: batch → model inputs for ``dataloader``.
        """
        batches: Iterable[ModelInputs]
        if dataloader is None:
            batches = [self.bad_case_inputs()]
        else:
            batches = iter_batches(dataloader, num_steps, input_fn)
        self._records, self._order = record_layers(self.model, batches, self.float_model)
        self.comparison = None

    def compare_per_layer(
        self, range_factor: float = 1.5, int8_limit: float = 10.0, plot: bool = True
    ) -> LayerComparison:
        """Build the per-layer table and advisor; write ``compare_per_layer.txt``/``.csv``/``.json``/``.png``.

        Calls :meth:`run` on the bad cases first if it has not run.

        Args:
            range_factor: flag an op whose float |max| exceeds this multiple of its calibrated range.
            int8_limit: flag an int8 op whose float |max| exceeds this (suggest int16).
            plot: also write ``compare_per_layer.png`` (cosine and SQNR along depth).
        """
        if self._records is None:
            self.run()
        records = self._records if self._records is not None else {}
        self.comparison = compare_layers(records, self._order, range_factor, int8_limit)
        self._write("compare_per_layer.txt", layer_text(self.comparison, *self._float_ops()))
        self._write("compare_per_layer.csv", layer_csv(self.comparison))
        self._write("compare_per_layer.json", to_json(self.comparison))
        if plot:
            write_atomic(self.out_dir / "compare_per_layer.png", layer_png(self.comparison))
        return self.comparison

    # ------------------------------------------------------------------ sensitivity
    def sensitivity(
        self,
        metric: MetricLike = "L1",
        types: Sequence[str] = SENSITIVE_TYPES,
        method: str = "exact",
        inputs: Any = None,
        num_probes: int = 1,
        plot: bool = True,
    ) -> list[SensitivityTable]:
        """One sensitivity table per model output, most sensitive first.

        Writes ``sensitivity_<output>.txt``/``.csv``/``.json`` (and a top-30 ``.png``) per output.

        Args:
            metric: the error metric (as for bad cases); COSINE/SQNR rows hold ``1 - cos``/``-SQNR``.
            types: ``activation`` and/or ``weight``.
            method: ``exact`` (only that op's nodes enabled, downstream slice on fx graphs) or
                ``approximate`` (first-order estimate, :mod:`qat_lightning.analysis.sensitivity.approximate`).
            inputs: model inputs (a tensor, a tuple of args or a dict of kwargs); default: the bad cases.
            num_probes: random probes per output for ``approximate``.
            plot: also write the bar charts.

        Raises:
            ValueError: for an unknown metric, type or method, or no inputs.
        """
        resolved = resolve_metric(metric)
        kinds = check_types(types)
        if method not in SENSITIVITY_METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SENSITIVITY_METHODS)}")
        batch = self.bad_case_inputs() if inputs is None else normalize_inputs(inputs)
        targets = sensitivity_targets(self.model, kinds)
        float_ops, total = self._float_ops()  # the shares count the unquantized ops' FLOPs too
        if method == "exact":
            results = exact_sensitivity(self.model, batch, resolved, targets)
        else:
            results = approximate_sensitivity(self.model, batch, resolved, targets, num_probes=num_probes)
        self.tables = build_tables(results, resolved, method, total)
        for table in self.tables:
            stem = f"sensitivity_{safe_filename(table.output_name)}"
            self._write(f"{stem}.txt", sensitivity_text(table, float_ops, total))
            self._write(f"{stem}.csv", sensitivity_csv(table))
            self._write(f"{stem}.json", to_json(table))
            if plot:
                write_atomic(self.out_dir / f"{stem}.png", sensitivity_png(table))
        return self.tables

    # ------------------------------------------------------------------ helpers
    def _float_ops(self) -> tuple[tuple[Any, ...], int]:
        """Return the model's unquantized ops (``prepare_record.float_ops``) and the FLOPs of all ops."""
        record = getattr(self.model, "prepare_record", None)
        float_ops = tuple(getattr(record, "float_ops", ()))
        quantized = sum(op.op_info.flops for _, op in iter_quant_ops(self.model))
        return float_ops, quantized + sum(op.flops for op in float_ops)

    def _write(self, name: str, text: str) -> Path:
        return write_atomic(self.out_dir / name, text)


def vars_of(obj: Any) -> dict[str, Any]:
    """Fields of a dataclass instance as a dict (shallow)."""
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
