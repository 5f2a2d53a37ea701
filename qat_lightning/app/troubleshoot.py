"""``stage=troubleshoot``: the seed's three checks for a QAT run that does not converge, in one command.

From the float checkpoint (``ckpt=`` or ``<run dir>/checkpoints/float.ckpt``) it calibrates ``recipe`` (tuned
as ``stage=calibration`` tunes it: ``recipe.int16_ratio`` / ``fp16_topk`` / ``sensitivity_table`` or the
searches) and runs, each as a short run of ``sanity.steps`` training steps with the QAT settings (``qat.lr``,
``qat.scheduler``, the same data):

1. **float fine-tune through the QAT pipeline, without prepare**: expected to score at least the float
   model (within ``sanity.tolerance``); else the training pipeline itself (data preprocessing /
   augmentation, loss, optimizer, LR) is at fault, not quantization;
2. **QAT with fake quant off**: expected to score at least like check 1, a float fine-tune of the same
   length and settings (one-sided: scoring better is not a failure); else prepare / the quantization tool
   (model surgery: fusion, qat_mode, module replacement) changes the float behaviour;
3. **QAT with lr = 0**: the weights, activation scales and BN statistics are held, so it must score exactly
   like the calibration model; else something besides the optimizer changes the model in training. What
   the held BN statistics would learn from the training data is measured: training data that differ from
   the calibration data (a preprocessing mismatch) fail this check with that drift named as the cause,
   while the ordinary drift of QAT does not (the verdict is the same whichever path wrote the checkpoints).

The diagnosis table (expected vs got, verdict, which part is at fault) goes to ``troubleshoot.md``, the
summary and the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qat_lightning.app.summary import Summary
from qat_lightning.files import write_atomic

__all__ = ["CheckRow", "TroubleshootReport", "render_troubleshoot", "troubleshoot_stage"]

log = logging.getLogger("qat_lightning")

AT_FAULT = {
    "float fine-tune": "the training pipeline (data preprocessing / augmentation, loss, optimizer, LR): "
    "fix it before any quantization tuning (checks 2-3 are not conclusive until it passes)",
    "fake quant off": "prepare / the quantization tool: the prepared model in FLOAT state does not train "
    "like the float model (fusion, qat_mode, module replacement, shared modules)",
    "lr = 0": "the training data or updates outside the optimizer: training batches that differ from the "
    "calibration data (a preprocessing mismatch, strong augmentation; the BN drift is in sanity_check.txt), "
    "or code that changes the model besides the optimizer",
}


@dataclass(frozen=True)
class CheckRow:
    """One of the three checks.

    Attributes:
        check: ``float fine-tune``, ``fake quant off`` or ``lr = 0``.
        expected: what it should score (reference metric).
        expected_from: where the reference comes from.
        got: what it scored (``None``: no result).
        passed: whether ``got`` is within tolerance of ``expected`` (checks 1 and 2: or better).
        at_fault: the part of the pipeline a failure points at (empty when passed).
    """

    check: str
    expected: float | None
    expected_from: str
    got: float | None
    passed: bool
    at_fault: str = ""


@dataclass(frozen=True)
class TroubleshootReport:
    """The three checks and the verdict.

    Attributes:
        monitor: the metric.
        tolerance: allowed absolute difference.
        rows: the checks in order.
    """

    monitor: str
    tolerance: float
    rows: tuple[CheckRow, ...]

    @property
    def verdict(self) -> str:
        """The first failing check's part of the pipeline, or that the pipeline is sound."""
        for row in self.rows:
            if not row.passed:
                return f"check '{row.check}' fails: at fault is {row.at_fault}"
        return (
            "all three checks pass: the training pipeline and the quantization tool are sound; tune "
            "quantization itself (qat.lr_probe, qat.scales, the int16 ratio)"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_troubleshoot(report: TroubleshootReport) -> str:
    """Render the diagnosis table as Markdown (``troubleshoot.md``)."""
    lines = [
        f"# QAT troubleshooting ({report.monitor}, tolerance {report.tolerance:g})",
        "",
        "| check | expected | reference | got | diff | verdict | at fault |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        diff = "-" if r.got is None or r.expected is None else f"{r.got - r.expected:+.4f}"
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(
            f"| {r.check} | {_fmt(r.expected)} | {r.expected_from} | {_fmt(r.got)} | {diff} | {verdict} | "
            f"{r.at_fault or '-'} |"
        )
    lines += ["", f"**Verdict**: {report.verdict}"]
    return "\n".join(lines) + "\n"


def _row(check: str, expected: float | None, source: str, got: float | None, passed: bool) -> CheckRow:
    return CheckRow(check, expected, source, got, passed, "" if passed else AT_FAULT[check])


def troubleshoot_stage(pipe: Any) -> Summary:
    """``stage=troubleshoot``: calibrate, run the three checks, write the diagnosis table."""
    from qat_lightning.app.checkpoints import is_rank_zero
    from qat_lightning.app.qat_optimizers import qat_optimizers
    from qat_lightning.app.recipes import recipe_from_conf
    from qat_lightning.app.stage_runners import tune_recipe

    cfg, s = pipe.cfg, pipe.session
    recipe = recipe_from_conf(cfg.recipe, cfg.chip, cfg.calibration)
    float_ckpt = pipe.resolve_ckpt("float")
    float_metric = pipe.float_metric_of(float_ckpt, s.run_dir)
    pipe.result("float", None, float_metric, float_metric)
    # as stage=calibration: recipe.mixed / int16_ratio / fp16_topk / sensitivity_table decide the rows
    recipe = tune_recipe(pipe, cfg.recipe, recipe, float_ckpt, float_metric)
    _, calib_metric, calib_ckpt, _ = pipe.calibrate(
        "calibration", f"calibration {recipe.name}", float_ckpt, recipe, float_metric, "calibration"
    )
    tol, steps = cfg.sanity.tolerance, cfg.sanity.steps
    # 1. float fine-tune through the QAT settings, no prepare
    out = pipe.step("check1_float_finetune", "check 1: float fine-tune with the QAT settings (no prepare)")
    lit, _ = s.load_float(float_ckpt)
    lit.configure_optimizers = qat_optimizers(  # type: ignore[method-assign]
        lit, lit.configure_optimizers, cfg.qat.lr, cfg.qat.scheduler.value
    )
    trainer = s.trainer(
        out, max_epochs=1, max_steps=-1, limit_train_batches=steps, limit_val_batches=s._val_limit()
    )
    trainer.fit(lit, datamodule=s.datamodule())
    got1 = s._metric(trainer.validate(lit, datamodule=s.datamodule(), verbose=False), trainer)
    ok1 = got1 >= float_metric - tol if s.higher_is_better else got1 <= float_metric + tol
    rows = [_row("float fine-tune", float_metric, "float model", got1, ok1)]
    pipe.result("check 1: float fine-tune", None, got1, float_metric, note="PASS" if ok1 else "FAIL")
    # 2. fake quant off, 3. lr = 0 (the SanityCheck runs of the same length)
    for check, mode, reference, source in (
        ("fake quant off", "float", got1, "check 1"),
        ("lr = 0", "lr0", calib_metric, "calibration model"),
    ):
        no = len(rows) + 1
        out = pipe.step(f"check{no}_{mode}", f"check {no}: QAT with {check}")
        result = s.sanity(mode, calib_ckpt, reference, out)
        got = None if result is None else result.result
        passed = bool(result is not None and result.passed)
        row = _row(check, reference, source, got, passed)
        if mode == "float" and not ok1 and not passed:  # its reference is the failed check 1
            row = CheckRow(
                check, reference, source, got, passed, "not conclusive: its reference (check 1) fails"
            )
        rows.append(row)
        pipe.result(f"check {no}: QAT {check}", recipe, got, float_metric, note="PASS" if passed else "FAIL")
    report = TroubleshootReport(s.monitor, tol, tuple(rows))
    text = render_troubleshoot(report)
    if is_rank_zero():
        s.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic((s.run_dir / "troubleshoot.md"), text)
    log.info("troubleshooting:\n%s", text)
    for row in rows:
        pipe.decide(
            f"check '{row.check}': {'PASS' if row.passed else 'FAIL'} (got {_fmt(row.got)} vs expected "
            f"{_fmt(row.expected)} from the {row.expected_from})"
        )
    pipe.decide(f"verdict: {report.verdict}")
    pipe.console.print(text)
    return pipe.finish(
        f"qat-lightning: troubleshooting ({recipe.name} on {pipe.chip})", {"verdict": report.verdict}
    )


def report_path(run_dir: Path) -> Path:
    """Where the diagnosis table is written."""
    return run_dir / "troubleshoot.md"
