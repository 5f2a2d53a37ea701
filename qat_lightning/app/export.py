"""``stage=export`` and the pipeline's last step: the chosen model as QDQ ONNX, checked in onnxruntime.

The step writes ``<step dir>/model.onnx``, ``model.encodings.json`` and ``export_check.txt/json`` (through
the :class:`~qat_lightning.callbacks.ExportOnnx` callback on a validation trainer), adds a summary row
(the onnxruntime model's worst cosine vs fake quant in the note) and a decision with every output's
numbers, so ``summary.md`` shows them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qat_lightning.app.pipeline import Pipeline
from qat_lightning.app.summary import Summary

__all__ = ["export_chosen", "export_model", "export_stage"]

log = logging.getLogger("qat_lightning")


def export_model(pipe: Pipeline, lit: Any, recipe: Any, out: Path, what: str) -> Any:
    """Export ``lit``'s network into ``out`` and check it; record the numbers; return the outcome."""
    from qat_lightning.callbacks import ExportOnnx

    e = pipe.cfg.export
    callback = ExportOnnx(
        path=(out / "model.onnx").resolve(),
        check_batches=e.check_batches,
        dataloader="val",
        opset=e.opset,
        dynamic_batch=e.dynamic_batch,
        run_on_fit_end=False,
        submodule=pipe.cfg.prepare.submodule,
    )
    session = pipe.session
    trainer = session.trainer(out, [callback], logger=False, limit_val_batches=1)
    trainer.validate(lit, datamodule=session.datamodule(), verbose=False)  # sets the loaders up
    outcome = callback.export(trainer, lit)  # rank zero exports, the others get None
    if outcome is None:
        return None
    check = outcome.check
    note = f"onnx: {outcome.result.size_bytes / 1024:.0f} KiB, {outcome.result.num_qdq} QDQ"
    if check is not None:
        worst = min(o.cosine for o in check.outputs)
        note += f", ort cosine {worst:.5f} {'PASS' if check.passed else 'FAIL'}"
        pipe.decide(f"ONNX export of {what} ({outcome.result.path}): {_numbers(check)}")
        if not check.passed:
            log.error(
                "ONNX EXPORT CHECK FAILED (%s):\n%s",
                what,
                "\n".join(check.problems) or "see export_check.txt",
            )
    else:
        pipe.decide(
            f"ONNX export of {what} ({outcome.result.path}); no onnxruntime check (export.check_batches=0)"
        )
    pipe.result(f"onnx export ({what})", recipe, None, None, lit, None, out, note)
    return outcome


def export_chosen(pipe: Pipeline, qat_lit: Any, chosen_ckpt: Path, chosen: Any) -> Any:
    """Run the pipeline's last step: export the QAT module (``None``: reload the chosen calibration)."""
    what = f"QAT {chosen.name}" if qat_lit is not None else f"calibration {chosen.name}"
    out = pipe.step("export", f"ONNX export of the {what} model + onnxruntime check")
    lit = qat_lit if qat_lit is not None else pipe.session.load_quantized(chosen_ckpt, out)[0]
    return export_model(pipe, lit, chosen, out, what)


def _numbers(check: Any) -> str:
    parts = []
    for o in check.outputs:
        top1 = "" if o.top1_agreement is None else f", top-1 agreement {100 * o.top1_agreement:.2f}%"
        parts.append(
            f"{o.name}: cosine {o.cosine:.5f}, SQNR {o.sqnr_db:.1f} dB, max |err| {o.max_abs_error:.3g}{top1}"
        )
    off = ", ".join(f"{o.name} cosine {o.cosine:.5f}" for o in check.unoptimized)
    if off:
        parts.append(f"with onnxruntime's optimizations off: {off}")
    verdict = "PASSED" if check.passed else f"FAILED ({'; '.join(check.problems) or 'below the thresholds'})"
    note = "" if check.optimization_note is None else f" ({check.optimization_note})"
    return (
        f"onnxruntime (optimization {check.optimization}) vs fake quant on {check.num_batches} batches: "
        f"{'; '.join(parts)} -> {verdict}{note}"
    )


def export_stage(pipe: Pipeline) -> Summary:
    """``stage=export``: load a calibration/QAT checkpoint, export it, check it in onnxruntime."""
    ckpt = pipe.resolve_ckpt("calibration")
    out = pipe.step("export", f"ONNX export of {ckpt.name}", own_dir=False)
    lit, info = pipe.session.load_quantized(ckpt, out)
    export_model(pipe, lit, info.recipe, out, ckpt.name)
    return pipe.finish(
        f"qat-lightning: ONNX export ({info.recipe.name if info.recipe else '?'} on {pipe.chip})"
    )
