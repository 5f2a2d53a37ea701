"""``QuantAnalysisCallback``: bad cases, per-layer comparison, sensitivity (and mixed-precision search).

After ``trainer.fit`` (``on_fit_end``) and on demand (:meth:`QuantAnalysisCallback.run_analysis`) it runs the
shared analysis core on the network, comparing it with itself in float (the quant nodes in FLOAT state),
as the seed does after calibration. Everything is written under ``<log_dir>/quant_analysis/`` by global
rank zero only; the other ranks return at once. While the analysis runs the directory holds an
``INCOMPLETE`` marker; it is removed on success and keeps the error message when the analysis fails.
Plots (PNG) are logged to TensorBoard as images and the text tables as text.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from qat_lightning.analysis import QuantAnalysis, SearchReporter, search_mixed_precision
from qat_lightning.analysis.compare.metrics import Metric, resolve_metrics
from qat_lightning.analysis.inputs import flatten_outputs
from qat_lightning.callbacks._checks import (
    check_callable,
    check_count,
    check_dataloader,
    check_number,
    check_submodule,
    require_bool,
)
from qat_lightning.callbacks._common import (
    InputFn,
    batch_transfer,
    call_model,
    default_input_fn,
    get_submodule,
    normalize_inputs,
    preserved_modes,
    request_dataloader,
    resolve_log_dir,
    switch_states,
)
from qat_lightning.callbacks.logging import flush_loggers, log_figure, log_image_file, log_scalars, log_text
from qat_lightning.files import write_atomic
from qat_lightning.ptq import float_reference
from qat_lightning.quant.checks import require_str
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState, fake_quant_state
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

__all__ = [
    "INCOMPLETE_MARKER",
    "AnalysisOutcome",
    "QuantAnalysisCallback",
    "output_cosine_eval_fn",
    "sensitivity_figure",
]

INCOMPLETE_MARKER = "INCOMPLETE"


@dataclass(frozen=True)
class AnalysisOutcome:
    """What one analysis run produced (rank zero; other ranks get ``None`` from ``run_analysis``).

    Attributes:
        out_dir: the ``quant_analysis`` directory.
        per_layer: the per-layer comparison table (as returned by the core).
        sensitivity: one sensitivity table per model output (empty when disabled).
        plan: the mixed-precision plan (``None`` when no search target was given).
        seconds: wall time of the analysis.
        files: every file under ``out_dir`` after the run.
    """

    out_dir: Path
    per_layer: Any = None
    sensitivity: tuple[SensitivityTable, ...] = ()
    plan: Any = None
    seconds: float = 0.0
    files: tuple[Path, ...] = field(default_factory=tuple)


def output_cosine_eval_fn(
    batches: Iterable[Any], input_fn: InputFn | None = None, num_steps: int | None = 8
) -> Callable[[nn.Module], float]:
    """Build ``eval_fn(model) -> float``: mean cosine similarity of the model's outputs to its float outputs.

    A model-agnostic accuracy proxy for the mixed-precision search when no task metric is given: the float
    outputs (quant nodes FLOAT) are computed once, then each call compares the current (quantized) outputs
    with them over the same ``num_steps`` batches. 1.0 means identical to float. Both run inside
    :func:`qat_lightning.ptq.float_reference`: after AdaRound / bias correction the float outputs are the
    original float model's, and an op raised to another dtype quantizes its original float weight.
    """
    check_count("num_steps", num_steps, "output_cosine_eval_fn", allow_none=True)
    fn = input_fn or default_input_fn
    cached: list[tuple[Any, list[torch.Tensor]]] = []

    def eval_fn(model: nn.Module) -> float:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad(), preserved_modes(model), float_reference(model):
            model.eval()
            if not cached:
                for batch in islice(batches, num_steps):
                    inputs = move_data_to_device(normalize_inputs(fn(batch)), device)
                    with fake_quant_state(model, FakeQuantState.FLOAT):
                        ref = [
                            t.detach().flatten().double()
                            for _, t in flatten_outputs(call_model(model, inputs))
                        ]
                    cached.append((inputs, ref))
            if not cached:  # every probe would score 0.0: no op could ever reach a target
                raise ValueError("output_cosine_eval_fn: the batches gave no batch to compare outputs on")
            sims = []
            for inputs, ref in cached:
                outs = [t.detach().flatten().double() for _, t in flatten_outputs(call_model(model, inputs))]
                a, b = torch.cat(ref), torch.cat(outs)
                sims.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        return sum(sims) / len(sims)

    return eval_fn


def sensitivity_figure(table: SensitivityTable, top: int = 30) -> Any:
    """Draw the ``top`` most sensitive rows of ``table`` as a horizontal bar chart (``None`` if empty)."""
    rows = list(table.rows[:top])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.5))
    labels = [f"{r.op_name} ({r.sensitive_type}, {r.quant_dtype})" for r in rows]
    ax.barh(range(len(rows)), [r.metric for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{table.metric_name} with only this node quantized")
    ax.set_title(f"sensitivity, output {table.output_name} (top {len(rows)})")
    fig.tight_layout()
    return fig


def _as_tables(result: Any) -> tuple[SensitivityTable, ...]:
    if result is None:
        return ()
    if isinstance(result, SensitivityTable):
        return (result,)
    if isinstance(result, dict):
        return tuple(result.values())
    return tuple(result)


def _check_metrics(metrics: Any) -> tuple[Any, ...]:
    """Return the metrics as a tuple (a str is one metric) once :func:`resolve_metrics` accepts them.

    Raises:
        ValueError: for no metric, an unknown name (the message lists the built-in names) or duplicates.
    """
    if not metrics and not callable(metrics):
        raise ValueError("metrics must name at least one metric, e.g. ('COSINE', 'L1', 'ATOL')")
    resolve_metrics(metrics)
    return (metrics,) if isinstance(metrics, (str, Metric)) or callable(metrics) else tuple(metrics)


class QuantAnalysisCallback(Callback):
    r"""Run the seed's accuracy debugging on the network after fit, and on demand.

    Steps: ``auto_find_bad_case`` on ``dataloader`` -> ``run`` -> ``compare_per_layer`` -> ``sensitivity``
    (when enabled) -> ``search_mixed_precision`` (when ``search_target`` is set). The float reference is the
    same network with fake quant off, so op names align exactly; the analysis and the search run inside
    :func:`qat_lightning.ptq.float_reference` (after AdaRound / bias correction, fake quant off is the
    original float model). The network's modes and quant states are restored afterwards.

    Args:
        dataloader: ``"val"`` (default), ``"train"``, ``"test"`` or any iterable of batches. Under DDP rank
            zero analyses its own shard.
        num_steps: batches used to find bad cases (``None``: all).
        metrics: error metrics for bad cases (``COSINE``, ``L1``, ``ATOL``, ``MSE``, ``SQNR``, ``KL``, or
            callables, as ``QuantAnalysis.auto_find_bad_case`` takes them); one name as a str or a list.
        sensitivity: compute the sensitivity tables.
        search_target: run the mixed-precision search to reach this value of ``search_eval_fn``.
        search_eval_fn: ``eval_fn(model) -> float`` for the search (higher is better); default
            :func:`output_cosine_eval_fn` on 8 batches of ``dataloader`` (so a target like ``0.999``).
        input_fn: batch -> model inputs.
        run_on_fit_end: analyse automatically at the end of ``trainer.fit``.
        submodule: attribute path of the network inside the LightningModule.
        dirname: sub-directory of the log dir.

    Raises:
        ValueError: at construction for an unknown dataloader name, an empty metric list or an unknown
            metric name, a ``num_steps`` below 1, a non-finite ``search_target`` or an empty ``dirname``.
        TypeError: at construction for a non-int ``num_steps`` (``1.5``), a non-bool flag (``"no"``), a
            non-number ``search_target``, a non-callable ``search_eval_fn`` / ``input_fn``, a dataloader that
            is neither a name nor an iterable, a non-str submodule or dirname.
    """

    def __init__(
        self,
        dataloader: str | Iterable[Any] = "val",
        num_steps: int | None = None,
        metrics: Sequence[Any] = ("COSINE", "L1", "ATOL"),
        sensitivity: bool = True,
        search_target: float | None = None,
        search_eval_fn: Callable[[nn.Module], float] | None = None,
        input_fn: InputFn | None = None,
        run_on_fit_end: bool = True,
        submodule: str = "model",
        dirname: str = "quant_analysis",
    ) -> None:
        super().__init__()
        who = "QuantAnalysisCallback"
        self.dataloader = check_dataloader(dataloader, who)
        self.num_steps = check_count("num_steps", num_steps, who, allow_none=True)
        self.metrics = _check_metrics(metrics)
        self.sensitivity = require_bool("sensitivity", sensitivity, who)
        self.search_target = check_number("search_target", search_target, who)
        self.search_eval_fn = check_callable("search_eval_fn", search_eval_fn, who)
        self.input_fn = check_callable("input_fn", input_fn, who)
        self.run_on_fit_end = require_bool("run_on_fit_end", run_on_fit_end, who)
        self.submodule = check_submodule(submodule, who)
        self.dirname = require_str("dirname", dirname, who, empty=False)
        self.outcome: AnalysisOutcome | None = None
        self._out_dir: Path | None = None
        self._running = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(submodule=self.submodule, dirname=self.dirname)

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the output directory on every rank (Lightning broadcasts the log dir)."""
        self._out_dir = resolve_log_dir(trainer) / self.dirname

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Analyse after training (rank zero)."""
        if self.run_on_fit_end:
            self.run_analysis(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Leave an interrupted analysis marked incomplete and flush the writers."""
        if self._running and self._out_dir is not None and trainer.is_global_zero:
            self._mark_incomplete(f"interrupted: {type(exception).__name__}: {exception}")
        self._running = False
        flush_loggers(trainer)

    def state_dict(self) -> dict[str, Any]:
        """Plain config."""
        return {"metrics": list(map(str, self.metrics)), "search_target": self.search_target}

    # ---------------------------------------------------------------------------------------------- work
    def run_analysis(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AnalysisOutcome | None:
        """Run the analysis now and write it under ``<log_dir>/quant_analysis/``.

        Call it on every rank (only rank zero works; the log dir is resolved at ``setup``).

        Returns:
            The outcome on rank zero, ``None`` elsewhere.

        Raises:
            Whatever the analysis core raises (the directory keeps an ``INCOMPLETE`` marker with the error).
        """
        if self._out_dir is None:
            self._out_dir = resolve_log_dir(trainer) / self.dirname
        if not trainer.is_global_zero:
            return None
        model = get_submodule(pl_module, self.submodule)
        loader = request_dataloader(trainer, pl_module, self.dataloader)
        self._running = True
        self._mark_incomplete("analysis running")
        start = time.perf_counter()
        try:
            with preserved_modes(model):
                model.eval()
                switch_states(
                    model, (FakeQuantState.QAT, FakeQuantState.CALIBRATION), FakeQuantState.VALIDATION
                )
                outcome = self._analyse(model, loader, self._out_dir, batch_transfer(trainer))
        except BaseException as err:
            self._mark_incomplete("failed:\n" + "".join(traceback.format_exception(err)))
            self._running = False
            raise
        self._running = False
        (self._out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
        outcome = AnalysisOutcome(
            self._out_dir,
            outcome.per_layer,
            outcome.sensitivity,
            outcome.plan,
            time.perf_counter() - start,
            tuple(sorted(p for p in self._out_dir.rglob("*") if p.is_file())),
        )
        self.outcome = outcome
        self._log(trainer, outcome)
        rank_zero_info(f"QuantAnalysis: reports in {self._out_dir} ({outcome.seconds:.1f} s)")
        return outcome

    def _analyse(
        self, model: nn.Module, loader: Any, out_dir: Path, transfer: Callable[[Any], Any]
    ) -> AnalysisOutcome:
        user_fn = self.input_fn or default_input_fn

        def fn(batch: Any) -> Any:  # as Lightning's loops give it: moved, precision-converted
            return user_fn(transfer(batch))

        def input_fn(batch: Any) -> Any:
            return normalize_inputs(fn(batch))

        qa = QuantAnalysis(model, out_dir=str(out_dir))
        qa.auto_find_bad_case(loader, num_steps=self.num_steps, metrics=self.metrics, input_fn=input_fn)
        qa.run()
        per_layer = qa.compare_per_layer()
        tables = _as_tables(qa.sensitivity()) if self.sensitivity or self.search_target is not None else ()
        plan = None
        if self.search_target is not None and tables:
            eval_fn = self.search_eval_fn or output_cosine_eval_fn(loader, input_fn=fn)
            chip = getattr(getattr(model, "prepare_record", None), "chip", None)
            reporter = SearchReporter(out_dir)
            with float_reference(model):  # after AdaRound a raised op quantizes its float weight (the app's)
                plan = search_mixed_precision(
                    model,
                    list(tables),
                    eval_fn,
                    target=self.search_target,
                    chip=chip,
                    on_probe=reporter.probe,
                )
            reporter.write(plan)
        return AnalysisOutcome(out_dir, per_layer, tables, plan)

    def _mark_incomplete(self, why: str) -> None:
        if self._out_dir is None:
            return
        write_atomic(self._out_dir / INCOMPLETE_MARKER, f"quant_analysis is incomplete: {why}\n")

    def _log(self, trainer: pl.Trainer, outcome: AnalysisOutcome) -> None:
        for path in outcome.files:
            tag = f"{self.dirname}/{path.relative_to(outcome.out_dir).with_suffix('').as_posix()}"
            try:
                if path.suffix == ".png":
                    log_image_file(trainer, tag, path)
                elif path.suffix == ".txt":
                    log_text(trainer, tag, path.read_text(encoding="utf-8")[:100_000])
            except Exception as err:  # noqa: BLE001 - a report that cannot be logged stays on disk
                rank_zero_info(f"QuantAnalysis: could not log {path.name} to TensorBoard: {err}")
        if not any(p.suffix == ".png" for p in outcome.files):
            for i, table in enumerate(outcome.sensitivity):
                figure = sensitivity_figure(table)
                if figure is not None:
                    log_figure(trainer, f"{self.dirname}/sensitivity_{i}_{table.output_name}", figure)
        scalars = {f"{self.dirname}/seconds": outcome.seconds}
        if outcome.plan is not None:
            for attr in ("ratio", "metric"):
                value = getattr(outcome.plan, attr, None)
                if isinstance(value, (int, float)):
                    scalars[f"{self.dirname}/plan_{attr}"] = float(value)
        log_scalars(trainer, scalars)
        flush_loggers(trainer)
