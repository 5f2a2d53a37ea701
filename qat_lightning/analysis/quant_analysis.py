"""``QuantAnalysis``: the seed's accuracy-debugging object (bad cases → per-layer → sensitivity).

.. code-block:: python

    qa = QuantAnalysis(calib_model, out_dir="quant_analysis")   # float reference = same model, quant off
    qa = QuantAnalysis(float_model, calib_model, "quant_analysis")  # or the original float model
    qa.auto_find_bad_case(dataloader)      # badcase.txt / badcase.json / badcase.pt
    qa.run()                               # per-op summaries on the bad cases
    qa.compare_per_layer()                 # compare_per_layer.txt / .csv / .json / .png
    tables = qa.sensitivity()              # sensitivity_<output>.txt / .csv / .json / .png, one per output

    # the deployed model as the reference: onnxruntime vs fake quant per quant point
    qa = QuantAnalysis(calib_model, out_dir="quant_analysis", reference="onnxruntime", onnx_path="m.onnx")
    qa.auto_find_bad_case(dataloader)      # bad cases still pick the samples (float vs calibration)
    qa.compare_per_layer()                 # compare_export_per_layer.txt / .csv / .json / .png

The calibrated model is evaluated as the seed's "calibration model": ``eval()``, quant nodes in
``VALIDATION`` (nodes a user put in FLOAT stay FLOAT); every state change is undone afterwards. With one
model, the float reference is that model with its quant nodes in FLOAT (names align exactly). With two,
bad cases compare the float model's outputs, the per-layer table aligns ops to float modules where it can
(:mod:`qat_lightning.analysis.compare.alignment`), and sensitivity always uses the prepared model in FLOAT
as the reference (it measures quant nodes, which only the prepared model has). Every run is inside
:func:`qat_lightning.ptq.float_reference`: after AdaRound / bias correction FLOAT is the original float model.

``reference="onnxruntime"`` (with ``onnx_path``, a file :func:`qat_lightning.quant.export.export_onnx` wrote)
makes the per-layer step compare the deployed model with the fake-quant model instead: every quant point of
the graph against the fake-quant node of the same name (:mod:`qat_lightning.analysis.export_layers`), so the
first point where deployment and fake quant part is found the way float vs calibration is. Bad cases and
sensitivity are unchanged by the reference.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from qat_lightning.analysis.checks import (
    ANALYSIS_REFERENCES,
    SENSITIVITY_METHODS,
    check_bool,
    check_number,
    check_out_dir,
    check_probes,
    check_reference,
    nonempty,
)
from qat_lightning.analysis.compare.bad_case import (
    BadCaseResult,
    bad_case_payload,
    find_bad_cases,
    read_bad_cases,
)
from qat_lightning.analysis.compare.layer_compare import LayerComparison, compare_layers
from qat_lightning.analysis.compare.layer_record import OpRecord, record_layers
from qat_lightning.analysis.compare.metrics import MetricLike, resolve_metric, resolve_metrics
from qat_lightning.analysis.export_layers import (
    ExportLayerComparison,
    compare_export_per_layer,
    export_layers_csv,
    export_layers_text,
)
from qat_lightning.analysis.inputs import InputFn, ModelInputs, iter_batches, normalize_inputs
from qat_lightning.analysis.reports.plots import export_layers_png, layer_png, sensitivity_png
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
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.quant.calibrate import require_calibrated
from qat_lightning.quant.nodes.fake_quantize import fake_quant_disabled
from qat_lightning.quant.ops import iter_quant_ops
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES, SensitivityTable

__all__ = ["ANALYSIS_REFERENCES", "QuantAnalysis", "SENSITIVITY_METHODS"]


class QuantAnalysis:
    """Bad cases, layer-by-layer comparison and sensitivity of a calibrated prepared model.

    Args:
        float_model: the original float model, or — when ``calib_model`` is omitted — the calibrated
            prepared model itself.
        calib_model: the calibrated prepared model (``None``: ``float_model`` is it).
        out_dir: where reports are written (created on first write).
        strict: refuse a model that was never calibrated with one clear error (``False``: warn once).
        reference: what the per-layer comparison measures the calibrated model against: ``float`` (the
            float model / quant off, the default) or ``onnxruntime`` (the exported ``onnx_path``).
        onnx_path: the exported model (``reference="onnxruntime"`` only; its ``.encodings.json`` beside it).

    Raises:
        ValueError: when the calibrated model has no quantized ops (not a prepared model), for an unknown
            reference, when ``onnx_path`` is missing, absent on disk or given with ``reference="float"``,
            or when ``out_dir`` (or a folder above it) is a file.
        UncalibratedModelError: when the model was never calibrated (unless ``strict=False``).
        TypeError: when ``strict`` is not a bool.
    """

    def __init__(
        self,
        float_model: nn.Module,
        calib_model: nn.Module | None = None,
        out_dir: str | os.PathLike = "quant_analysis",
        strict: bool = True,
        reference: str = "float",
        onnx_path: str | os.PathLike | None = None,
    ) -> None:
        check_bool("strict", strict, "QuantAnalysis")
        self.out_dir = check_out_dir(out_dir, "QuantAnalysis")
        self.onnx_path = check_reference(reference, onnx_path)
        self.reference = reference
        model = float_model if calib_model is None else calib_model
        if not any(True for _ in iter_quant_ops(model)):
            raise ValueError(
                "the calibrated model has no quantized ops; pass the model returned by prepare()"
            )
        require_calibrated(model, "QuantAnalysis", strict=strict)
        self.model = model
        self.float_model = None if calib_model is None or calib_model is float_model else float_model
        self.bad_cases: BadCaseResult | None = None
        self.comparison: LayerComparison | None = None
        self.tables: list[SensitivityTable] = []
        self.export_comparison: ExportLayerComparison | None = None
        self._records: dict[str, OpRecord] | None = None
        self._order: list[str] = []
        self._batches: list[ModelInputs] | None = None

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
        ref = float_reference(self.model)
        with analysis_mode(self.model), eval_mode(*([] if single else [self.float_model])), ref:
            self.bad_cases = find_bad_cases(
                self.model if single else self.float_model,
                self.model,
                dataloader,
                resolved,
                num_steps=num_steps,
                input_fn=input_fn,
                float_context=(lambda: fake_quant_disabled(self.model)) if single else None,
            )
        self._records = self._batches = None
        self._write("badcase.txt", bad_case_text(self.bad_cases))
        self._write("badcase.csv", bad_case_csv(self.bad_cases))
        fields = {k: getattr(self.bad_cases, k) for k in self.bad_cases.__dataclass_fields__}
        self._write("badcase.json", to_json({k: v for k, v in fields.items() if k != "samples"}))
        save_torch_atomic(bad_case_payload(self.bad_cases), self.out_dir / "badcase.pt")
        return self.bad_cases

    def load_bad_cases(self, path: str | os.PathLike | None = None) -> BadCaseResult:
        """Load bad cases written by :meth:`auto_find_bad_case` (default ``<out_dir>/badcase.pt``).

        Raises:
            FileNotFoundError: when there is no such file.
            ValueError: naming the file when it is not a bad-case file (the earlier bad cases are kept).
        """
        self.bad_cases = read_bad_cases(Path(path) if path is not None else self.out_dir / "badcase.pt")
        self._records = self._batches = None
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

        With ``reference="onnxruntime"`` this only keeps the batches; :meth:`compare_per_layer` runs
        onnxruntime and the fake-quant model on them.

        Args:
            dataloader: batches to use; default: the bad cases (one batch of all of them).
            num_steps: only the first ``num_steps`` batches of ``dataloader``.
            input_fn: batch → model inputs for ``dataloader``.

        Raises:
            ValueError: when ``dataloader`` gives no batch, or for a bad ``num_steps``; the earlier
                records are kept then (and when recording fails).
        """
        batches: Iterable[ModelInputs]
        if dataloader is None:
            batches = [self.bad_case_inputs()]
        else:
            batches = nonempty(
                iter_batches(dataloader, num_steps, input_fn), "the dataloader gave no batches"
            )
        if self.reference == "onnxruntime":
            self._batches = list(batches)
        else:
            with float_reference(self.model):
                self._records, self._order = record_layers(self.model, batches, self.float_model)
        self.comparison = self.export_comparison = None

    def compare_per_layer(
        self,
        range_factor: float | None = None,
        int8_limit: float | None = None,
        plot: bool = True,
        max_steps: float | None = None,
    ) -> LayerComparison | ExportLayerComparison:
        """Build the per-layer table and advisor; write ``compare_per_layer.txt``/``.csv``/``.json``/``.png``.

        Calls :meth:`run` on the bad cases first if it has not run. With ``reference="onnxruntime"`` it
        returns :meth:`compare_deployed_per_layer` instead (an :class:`ExportLayerComparison`).

        Args:
            range_factor: flag an op whose float |max| exceeds this multiple of its calibrated range
                (default 1.5; ``reference="float"`` only).
            int8_limit: flag an int8 op whose float |max| exceeds this (suggest int16; default 10;
                ``reference="float"`` only).
            plot: also write ``compare_per_layer.png`` (cosine and SQNR along depth).
            max_steps: ``reference="onnxruntime"`` only: see :meth:`compare_deployed_per_layer`.

        Raises:
            ValueError: for an argument the reference does not use, or out of its range (``range_factor``
                and ``int8_limit`` are finite numbers > 0).
            TypeError: for a non-number limit or a non-bool ``plot``.
        """
        check_number(
            "range_factor", range_factor, "compare_per_layer", low=0.0, low_open=True, allow_none=True
        )
        check_number("int8_limit", int8_limit, "compare_per_layer", low=0.0, low_open=True, allow_none=True)
        check_bool("plot", plot, "compare_per_layer")
        if self.reference == "onnxruntime":
            if range_factor is not None or int8_limit is not None:
                raise ValueError("range_factor and int8_limit apply to reference='float' only")
            return self.compare_deployed_per_layer(1.0 if max_steps is None else max_steps, plot)
        if max_steps is not None:
            raise ValueError("max_steps applies to reference='onnxruntime' only")
        if self._records is None:
            self.run()
        records = self._records if self._records is not None else {}
        self.comparison = compare_layers(
            records,
            self._order,
            1.5 if range_factor is None else range_factor,
            10.0 if int8_limit is None else int8_limit,
        )
        self._write("compare_per_layer.txt", layer_text(self.comparison, *self._float_ops()))
        self._write("compare_per_layer.csv", layer_csv(self.comparison))
        self._write("compare_per_layer.json", to_json(self.comparison))
        if plot:
            write_atomic(self.out_dir / "compare_per_layer.png", layer_png(self.comparison))
        return self.comparison

    def compare_deployed_per_layer(self, max_steps: float = 1.0, plot: bool = True) -> ExportLayerComparison:
        """Compare onnxruntime with the fake-quant model at every quant point, in graph order.

        Runs on the batches of :meth:`run` (default: the bad cases). Writes
        ``compare_export_per_layer.txt`` (first mismatch, then the table), ``.csv``, ``.json`` and ``.png``.

        Args:
            max_steps: a point whose error exceeds this many quantization steps plus twice its float32
                noise floor is a mismatch (``first_export_mismatch``; 1 step allows rounding ties).
                onnxruntime runs at its deployed optimization level (``"all"``).
            plot: also write ``compare_export_per_layer.png``.

        Raises:
            ValueError: unless ``reference="onnxruntime"``, or for ``max_steps`` < 0 or not finite.
        """
        if self.reference != "onnxruntime" or self.onnx_path is None:
            raise ValueError("compare_deployed_per_layer needs QuantAnalysis(..., reference='onnxruntime')")
        check_number("max_steps", max_steps, "compare_deployed_per_layer", low=0.0)
        check_bool("plot", plot, "compare_deployed_per_layer")
        if self._batches is None:
            self.run()
        rows = compare_export_per_layer(
            self.model, self.onnx_path, self._batches or [], input_fn=normalize_inputs, num_batches=None
        )
        comparison = ExportLayerComparison(str(self.onnx_path), rows, max_steps)
        self._write("compare_export_per_layer.txt", export_layers_text(comparison))
        self._write("compare_export_per_layer.csv", export_layers_csv(rows))
        self._write("compare_export_per_layer.json", to_json(comparison))
        if plot:
            write_atomic(self.out_dir / "compare_export_per_layer.png", export_layers_png(rows, max_steps))
        self.export_comparison = comparison
        return comparison

    # ------------------------------------------------------------------ sensitivity
    def sensitivity(
        self,
        metric: MetricLike = "L1",
        types: Sequence[str] = SENSITIVE_TYPES,
        method: str = "exact",
        inputs: Any = None,
        num_probes: int | None = None,
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
            num_probes: random probes per output, ``approximate`` only (default 1; the exact method
                measures every op, it has no probes).
            plot: also write the bar charts.

        Raises:
            ValueError: for an unknown metric, type or method, no inputs, ``num_probes`` < 1, or
                ``num_probes`` given with ``method="exact"``.
            TypeError: for a non-int ``num_probes`` or a non-bool ``plot``.
        """
        resolved = resolve_metric(metric)
        kinds = check_types(types)
        num_probes = check_probes(method, num_probes)
        check_bool("plot", plot, "sensitivity")
        batch = self.bad_case_inputs() if inputs is None else normalize_inputs(inputs)
        targets = sensitivity_targets(self.model, kinds)
        float_ops, total = self._float_ops()  # the shares count the unquantized ops' FLOPs too
        with float_reference(self.model):
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
