"""``ExportOnnx``: write the network as a QDQ ONNX model at the end of fit, and check it in onnxruntime.

On global rank zero only (the other ranks return at once), after ``trainer.fit`` (``on_fit_end``) or on demand
(:meth:`ExportOnnx.export`): :func:`qat_lightning.quant.export.export_onnx` writes ``path`` and its
``.encodings.json`` (atomically), then :func:`qat_lightning.analysis.check_export` runs onnxruntime beside
the fake-quant network on ``check_batches`` batches and writes ``export_check.txt`` / ``.json`` beside the
model; when the check fails, ``compare_export_per_layer.txt`` too (onnxruntime vs fake quant per quant point,
in graph order) and a warning naming the first point where they part. The example inputs are the first batch
of ``dataloader``; under a multi-process strategy rank zero checks on the whole split, not its own shard.

Half precision (``bf16-true``, ``16-true``; ``64-true`` too): the deployed QDQ model is float32 (the exporter
and onnxruntime's QuantizeLinear work on float32 activations), so a float32 copy of the network is exported
and checked, fed the loader's float32 batches; the trained network keeps its dtype. The copy holds the
trained weights exactly (every bf16/fp16 value is a float32 value) and the same float32 scales; the check
then compares onnxruntime with that float32 fake-quant model, which is what the chip runs.

What is exported is the deployed model: every quant node as in VALIDATION. A node the user left in FLOAT
state (fake quant off, a debugging state) is exported quantized, and the check compares against it
quantized: a warning names those nodes (an op meant to run in float gets a float32 dtype in its qconfig).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from qat_lightning.analysis import ExportCheck, check_export, compare_export_per_layer, first_export_mismatch
from qat_lightning.analysis.export_layers import render_export_layers
from qat_lightning.analysis.ort_sessions import ORT_OPTIMIZATIONS
from qat_lightning.callbacks._checks import (
    check_callable,
    check_count,
    check_dataloader,
    check_submodule,
    require_bool,
)
from qat_lightning.callbacks._common import (
    InputFn,
    check_choice,
    default_input_fn,
    first_batch,
    get_submodule,
    normalize_inputs,
    request_dataloader,
    require_prepared,
    resolve_log_dir,
)
from qat_lightning.callbacks.logging import log_scalars
from qat_lightning.files import write_atomic
from qat_lightning.quant.nodes.fake_quantize import FakeQuantState, iter_fake_quantize

__all__ = ["ExportOnnx", "ExportOutcome"]


@dataclass(frozen=True)
class ExportOutcome:
    """What :meth:`ExportOnnx.export` produced: the export (``ExportResult``) and its check (or ``None``)."""

    result: Any
    check: ExportCheck | None


class ExportOnnx(Callback):
    """Export the prepared network to ONNX (QDQ) after fit and check it in onnxruntime.

    Args:
        path: the ``.onnx`` file; a relative path is placed under the trainer's log dir.
        check_batches: batches of ``dataloader`` for :func:`~qat_lightning.analysis.check_export`
            (``0``: no check; ``None``: all).
        dataloader: ``"val"`` (default), ``"train"``, ``"test"`` or any iterable of batches.
        opset: ONNX opset (``21``; ``20`` for int8/fp16-only models and runtimes without opset 21).
        dynamic_batch: make dim 0 of inputs and outputs symbolic.
        optimization: onnxruntime graph optimization level the check is judged on (``"all"``, what a
            default session deploys; ``"disabled"``, ``"basic"``, ``"extended"``); see ``check_export``.
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).
        run_on_fit_end: export automatically at the end of ``trainer.fit``.
        submodule: attribute path of the network inside the LightningModule.

    Raises:
        ValueError: at construction for a path not ending in ``.onnx``, a negative ``check_batches``, an
            unknown dataloader name, opset or optimization level.
        TypeError: at construction for a non-int ``check_batches`` / ``opset`` (``1.5``, ``21.0``), a
            non-bool flag (``"no"``), a dataloader that is neither a name nor an iterable, a non-callable
            ``input_fn`` or a non-str submodule.
    """

    def __init__(
        self,
        path: str | Path = "model.onnx",
        check_batches: int | None = 8,
        dataloader: str | Iterable[Any] = "val",
        opset: int = 21,
        dynamic_batch: bool = True,
        optimization: str = "all",
        input_fn: InputFn | None = None,
        run_on_fit_end: bool = True,
        submodule: str = "model",
    ) -> None:
        super().__init__()
        who = "ExportOnnx"
        if Path(path).suffix != ".onnx":
            raise ValueError(f"path must end with .onnx, got {str(path)!r}")
        self.check_batches = check_count("check_batches", check_batches, who, minimum=0, allow_none=True)
        self.dataloader = check_dataloader(dataloader, who)
        self.opset = check_choice("opset", check_count("opset", opset, who), _export_module().EXPORT_OPSETS)
        check_choice("optimization", optimization, ORT_OPTIMIZATIONS)
        self.path = Path(path)
        self.dynamic_batch = require_bool("dynamic_batch", dynamic_batch, who)
        self.optimization = optimization
        self.input_fn = check_callable("input_fn", input_fn, who)
        self.run_on_fit_end = require_bool("run_on_fit_end", run_on_fit_end, who)
        self.submodule = check_submodule(submodule, who)
        self.outcome: ExportOutcome | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export (and check) when ``run_on_fit_end``."""
        if self.run_on_fit_end:
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ExportOutcome | None:
        """Export and check now; rank zero returns the outcome, other ranks ``None``."""
        target = self.path if self.path.is_absolute() else resolve_log_dir(trainer) / self.path
        if not trainer.is_global_zero:
            return None
        model = get_submodule(pl_module, self.submodule)
        require_prepared(model, "ExportOnnx", self.submodule)
        _warn_float_nodes(model)
        model = _float32_network(model)
        loader = request_dataloader(trainer, pl_module, self.dataloader, whole=True)
        example = normalize_inputs((self.input_fn or default_input_fn)(first_batch(loader)))
        target.parent.mkdir(parents=True, exist_ok=True)
        result = _export_module().export_onnx(
            model, example, target, opset=self.opset, dynamic_batch=self.dynamic_batch
        )
        check = None
        if self.check_batches != 0:
            check = check_export(
                model,
                target,
                loader,
                input_fn=self.input_fn,
                num_batches=self.check_batches,
                optimization=self.optimization,
            )
            log_scalars(trainer, _check_scalars(check))
            if not check.passed:
                _explain_failure(model, target, loader, self.input_fn, self.optimization)
            rank_zero_info(f"ONNX export check {'passed' if check.passed else 'FAILED'}: {target.parent}")
        self.outcome = ExportOutcome(result, check)
        return self.outcome


def _explain_failure(
    model: Any, target: Path, loader: Any, input_fn: InputFn | None, optimization: str
) -> None:
    """Write ``compare_export_per_layer.txt`` (onnxruntime vs fake quant per point); warn with the first."""
    rows = compare_export_per_layer(
        model, target, loader, input_fn=input_fn, num_batches=1, optimization=optimization
    )
    write_atomic(target.parent / "compare_export_per_layer.txt", render_export_layers(rows))
    bad = first_export_mismatch(rows)
    where = (
        "none beyond 1 step + its float32 noise" if bad is None else f"{bad.node} ({bad.max_steps:.1f} steps)"
    )
    rank_zero_warn(
        f"ONNX export check FAILED; first quant point where onnxruntime and fake quant part: {where}"
    )


def _float32_network(model: torch.nn.Module) -> torch.nn.Module:
    """Return ``model`` when its floating-point parameters are float32, else a float32 copy of it."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes <= {torch.float32}:
        return model
    shown = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    rank_zero_info(f"ExportOnnx: the network is {shown}; exporting and checking a float32 copy of it")
    return copy.deepcopy(model).float()


def _warn_float_nodes(model: Any) -> None:
    """Warn when nodes are in FLOAT state: the export (and its check) quantize them as VALIDATION does."""
    names = [name for name, node in iter_fake_quantize(model) if node.state is FakeQuantState.FLOAT]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        rank_zero_warn(
            f"ExportOnnx: {len(names)} quant node(s) are in FLOAT state in the model ({shown}); the ONNX "
            "export is the deployed model and quantizes them as in VALIDATION, and the check compares "
            "against that. To deploy an op in float, give it a float32 dtype in its qconfig."
        )


def _export_module() -> Any:
    """``qat_lightning.quant.export`` (imports onnx: a clear error when it is not installed)."""
    try:
        from qat_lightning.quant import export
    except ImportError as exc:
        raise ImportError(
            f"ExportOnnx needs onnx and onnxruntime ({exc}): pip install onnx onnxruntime"
        ) from exc
    return export


def _check_scalars(check: ExportCheck) -> dict[str, float]:
    out = {}
    for o in check.outputs:
        out[f"export/{o.name}/cosine"] = o.cosine
        if o.top1_agreement is not None:
            out[f"export/{o.name}/top1_agreement"] = o.top1_agreement
    return out
