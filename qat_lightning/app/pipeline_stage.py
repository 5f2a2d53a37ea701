"""``stage=pipeline``: the seed's tuning flow, one short function per step (see ``pipeline.py``).

1. float model (trained or ``ckpt=``) and the target; 2./3. high precision (int16, or gemm int16 + other
fp16 on j6p), analysed when it misses the target (int16/fp16 tuning off j6p); 4./5. low precision (all-int8,
``ptq=`` when it helps) and the minimal int16 ratio when it misses; 6. QAT; 7. sanity checks; 8. export.
The sanity-check step is shared with ``stage=qat`` (:func:`sanity_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qat_lightning.app.advice_steps import dual_int16_advice, fp16_advice
from qat_lightning.app.pipeline import Pipeline
from qat_lightning.app.recipes import Recipe
from qat_lightning.app.summary import Summary

__all__ = ["pipeline_stage", "sanity_step"]


@dataclass(frozen=True)
class _Run:
    """What the pipeline's steps share: the float checkpoint and metric, the target and the chip's kind."""

    float_ckpt: Path
    float_metric: float
    target: float
    j6p: bool

    @property
    def high_name(self) -> str:
        """The high-precision base recipe."""
        return "gemm_int16_other_fp16" if self.j6p else "int16"

    @property
    def low_name(self) -> str:
        """The low-precision base recipe."""
        return "gemm_int8_other_fp16" if self.j6p else "int8"

    @property
    def mixed_name(self) -> str:
        """The recipe the int16 search raises ops in."""
        return "gemm_int8_other_fp16" if self.j6p else "int8_int16"


def pipeline_stage(pipe: Pipeline) -> Summary:
    """``stage=pipeline``: the seed's tuning flow for the chip (module docstring of ``pipeline.py``)."""
    from qat_lightning.chips import get_chip

    cfg = pipe.cfg
    run = _float_step(pipe, get_chip(pipe.chip).gemm_double_int16)  # 1. float
    fp16_ops = _high_precision_step(pipe, run)  # 2./3. high precision (int16 / fp16)
    chosen, chosen_ckpt, chosen_metric = _low_precision_step(pipe, run, fp16_ops)  # 4./5. low precision
    chosen_ckpt = _as_standard_calibration(pipe, chosen_ckpt)
    qat_lit = _qat_step(pipe, run, chosen, chosen_ckpt, chosen_metric) if cfg.pipeline.qat else None  # 6.
    if cfg.pipeline.sanity:  # 7. sanity
        sanity_step(pipe, "lr0", chosen_ckpt, chosen_metric, chosen)
        sanity_step(pipe, "float", chosen_ckpt, run.float_metric, chosen)
    if cfg.export.enabled:  # 8. ONNX export of the chosen model (QAT if it ran), checked in onnxruntime
        from qat_lightning.app.export import export_chosen

        export_chosen(pipe, qat_lit, chosen_ckpt, chosen)
    return pipe.finish(f"qat-lightning pipeline on {pipe.chip}", {"chosen recipe": chosen.describe()})


def _float_step(pipe: Pipeline, j6p: bool) -> _Run:
    """Train the float model (or load ``ckpt=``) and set the target from its metric."""
    s, cfg = pipe.session, pipe.cfg
    if cfg.ckpt:
        out = pipe.step("float", "float model (given checkpoint)")
        float_ckpt = pipe.resolve_ckpt("float")
        lit, info = s.load_float(float_ckpt)
        float_metric = s.validate(lit, out)
        pipe.result("float (given)", None, float_metric, float_metric, lit, float_ckpt, out)
    else:
        out = pipe.step("float", "float training")
        lit, float_metric, float_ckpt, steps = s.train_float(out)
        pipe.result("float", None, float_metric, float_metric, lit, float_ckpt, out, f"{steps} steps")
    target = s.target(float_metric)
    pipe.decide(f"target {s.monitor} = {target:.4f} (float {float_metric:.4f}; {_target_text(pipe)})")
    return _Run(float_ckpt, float_metric, target, j6p)


def _high_precision_step(pipe: Pipeline, run: _Run) -> tuple[str, ...]:
    """Calibrate the high-precision recipe; below the target, analyse it (and find fp16 ops off j6p)."""
    s, high_name, target = pipe.session, run.high_name, run.target
    _, high = pipe.base_recipe(high_name)
    lit, m_high, ckpt_high, _ = pipe.calibrate(
        "calibration_high",
        f"calibration {high_name}",
        run.float_ckpt,
        high,
        run.float_metric,
        f"calibration_{high_name}",
    )
    if s.meets(m_high, target):
        pipe.decide(
            f"{high_name} {m_high:.4f} meets the target {target:.4f}: "
            f"go on to {'gemm int8' if run.j6p else 'all-int8'}"
        )
        return ()
    if not run.j6p:
        return _int16_fp16_step(pipe, run, lit, m_high)
    tables = pipe.analyze(lit, "analysis_high", f"analysis of {high_name} (below target)")
    fp16_advice(pipe, lit, pipe.current_dir)
    top = ", ".join(f"{r.op_name}/{r.sensitive_type}" for t in tables for r in t.rows[:5])
    pipe.decide(
        f"{high_name} {m_high:.4f} is below the target {target:.4f}: the most sensitive ops are {top}; "
        "the seed's fixes (fixed scale for gemm inputs, int16 + fixed scale for coordinates, input "
        "scaling or fp32 for non-gemm ops) are left to recipe.module_names; continuing with the gemm "
        "int8/int16 tuning"
    )
    return ()


def _int16_fp16_step(pipe: Pipeline, run: _Run, lit: Any, m_high: float) -> tuple[str, ...]:
    """All-int16 missed the target (not j6p): move the fewest sensitive ops to fp16 and calibrate that."""
    pipe.decide(
        f"all-int16 {m_high:.4f} is below the target {run.target:.4f}: "
        f"int16/fp16 tuning (fp16 is slow on {pipe.chip})"
    )
    conf_fp16, _ = pipe.base_recipe("int16_fp16")
    tables = pipe.analyze(lit, "analysis_int16", "analysis of int16 (fp16 candidates)")
    dual_int16_advice(pipe, lit, tables, pipe.current_dir)
    fp16_ops = pipe.fp16_step(lit, tables, run.target, conf_fp16, pipe.current_dir)
    if fp16_ops:
        _, mixed16 = pipe.base_recipe("int16_fp16", fp16_ops)
        pipe.calibrate(
            "calibration_int16_fp16",
            "calibration int16/fp16",
            run.float_ckpt,
            mixed16,
            run.float_metric,
            "calibration_int16_fp16",
        )
    return fp16_ops


def _low_precision_step(pipe: Pipeline, run: _Run, fp16_ops: tuple[str, ...]) -> tuple[Recipe, Path, float]:
    """Calibrate the low-precision recipe (``ptq=`` if it helps), raise ops to int16 if it misses the target.

    Returns the chosen recipe, its calibration checkpoint and its metric.
    """
    s, cfg = pipe.session, pipe.cfg
    mixed_conf, _ = pipe.base_recipe(run.mixed_name)
    _, low = pipe.base_recipe(run.low_name, fp16_ops)
    if fp16_ops:
        low = low.replace(name=f"{run.low_name}_fp16")
    low_title = "gemm int8 + other fp16" if run.j6p else ("all-int8" + (" + fp16 ops" if fp16_ops else ""))
    lit, m_low, ckpt_low, _ = pipe.calibrate(
        "calibration_low",
        f"calibration {low_title}",
        run.float_ckpt,
        low,
        run.float_metric,
        f"calibration_{low.name}",
    )
    use_ptq = False
    if not s.meets(m_low, run.target) and cfg.ptq.enabled:
        lit, m_low, ckpt_low, use_ptq = _ptq_step(
            pipe, run.float_ckpt, low, low_title, run.float_metric, run.target, (lit, m_low, ckpt_low)
        )
    chosen = _raise_to_int16(pipe, run, lit, low, low_title, m_low, mixed_conf, fp16_ops)
    if not chosen.raised:
        return chosen, ckpt_low, m_low
    _, chosen_metric, chosen_ckpt, _ = pipe.calibrate(
        "calibration_mixed",
        f"calibration {chosen.name} (chosen)" + (f" + ptq={cfg.ptq.name}" if use_ptq else ""),
        run.float_ckpt,
        chosen,
        run.float_metric,
        "calibration",
        ptq=use_ptq,
    )
    return chosen, chosen_ckpt, chosen_metric


def _raise_to_int16(
    pipe: Pipeline,
    run: _Run,
    lit: Any,
    low: Recipe,
    low_title: str,
    m_low: float,
    mixed_conf: Any,
    fp16_ops: tuple[str, ...],
) -> Recipe:
    """Keep ``low`` if it meets the target, else the mixed recipe with the minimal int16 ratio found."""
    target = run.target
    if pipe.session.meets(m_low, target):
        pipe.decide(f"{low_title} {m_low:.4f} meets the target {target:.4f}: no int16 needed")
        return low
    pipe.decide(f"{low_title} {m_low:.4f} is below the target {target:.4f}: analysis + minimal int16 ratio")
    tables = pipe.analyze(lit, "analysis_low", f"analysis of {low_title}: bad cases, per layer, sensitivity")
    outcome = pipe.int16_step(lit, tables, target, mixed_conf, run.j6p, pipe.current_dir)
    if outcome.chosen:
        return low.replace(name=run.mixed_name + ("_fp16" if fp16_ops else ""), raised=outcome.chosen)
    pipe.decide(f"nothing to raise: keeping {low.name} ({m_low:.4f})")
    return low


def _as_standard_calibration(pipe: Pipeline, chosen_ckpt: Path) -> Path:
    """Copy the chosen calibration checkpoint to the standard name ``calibration.ckpt`` (if elsewhere)."""
    if chosen_ckpt != pipe.session.ckpt_dir / "calibration.ckpt":
        import shutil

        from qat_lightning.app.checkpoints import barrier, is_rank_zero

        if is_rank_zero():
            shutil.copyfile(chosen_ckpt, pipe.session.ckpt_dir / "calibration.ckpt")
        barrier()
        chosen_ckpt = pipe.session.ckpt_dir / "calibration.ckpt"
    return chosen_ckpt


def _qat_step(pipe: Pipeline, run: _Run, chosen: Recipe, chosen_ckpt: Path, chosen_metric: float) -> Any:
    """QAT of the chosen recipe (after the LR probe, if configured); returns the QAT module."""
    cfg = pipe.cfg
    from qat_lightning.app.lr_probe import run_lr_probe

    lr = run_lr_probe(pipe, chosen_ckpt, chosen)
    shown = cfg.qat.lr if lr is None else lr
    from qat_lightning.app.scale_trial import run_qat

    title = f"QAT of {chosen.name} (no-warmup LR {shown}, {cfg.qat.scheduler.value})"
    qat_lit, m_qat, _, _ = run_qat(pipe, chosen_ckpt, chosen, chosen_metric, run.float_metric, lr, title)
    verdict = "meets" if pipe.session.meets(m_qat, run.target) else "is below"
    pipe.decide(f"QAT {m_qat:.4f} {verdict} the target {run.target:.4f} (calibration {chosen_metric:.4f})")
    return qat_lit


def _ptq_step(
    pipe: Pipeline,
    float_ckpt: Path,
    low: Recipe,
    low_title: str,
    float_metric: float,
    target: float,
    plain: tuple[Any, float, Path],
) -> tuple[Any, float, Path, bool]:
    """All-int8 missed the target: calibrate it again with the ``ptq=`` algorithms; keep whichever is better.

    Returns the module, metric and checkpoint to go on with, and whether they are the ``ptq=`` ones.
    """
    s, name = pipe.session, pipe.cfg.ptq.name
    lit, metric, ckpt, _ = pipe.calibrate(
        "calibration_low_ptq",
        f"calibration {low_title} + ptq={name}",
        float_ckpt,
        low,
        float_metric,
        f"calibration_{low.name}_ptq",
        ptq=True,
    )
    m_plain = plain[1]
    better = metric > m_plain if s.higher_is_better else metric < m_plain
    verdict = "meets" if s.meets(metric, target) else "is below"
    if better:
        pipe.decide(
            f"ptq={name} on {low_title}: {m_plain:.4f} -> {metric:.4f}, {verdict} the target {target:.4f}; "
            "kept (any int16 search runs on this improved model)"
        )
        return lit, metric, ckpt, True
    pipe.decide(f"ptq={name} on {low_title}: {m_plain:.4f} -> {metric:.4f}, no gain: dropped")
    return (*plain, False)


def _target_text(pipe: Pipeline) -> str:
    t = pipe.cfg.target
    return f"target.value={t.value}" if t.value is not None else f"{t.ratio_of_float:g} x float"


def sanity_step(
    pipe: Pipeline, mode: str, calib: Path, reference: float | None, recipe: Recipe | None
) -> None:
    """Run one sanity check (``lr0`` or ``float``) of a calibration checkpoint as a pipeline step."""
    title = {"lr0": "sanity check lr0 (QAT, every LR = 0)", "float": "sanity check float (fake quant off)"}[
        mode
    ]
    out = pipe.step(f"sanity_{mode}", title)
    if reference is None:
        pipe.decide(f"sanity {mode}: no reference metric recorded in {calib}; measured at train start")
    result = pipe.session.sanity(mode, calib, reference, out)
    status = "NO RESULT" if result is None else result.status
    got = None if result is None else result.result
    ref = "-" if reference is None else f"{reference:.4f}"
    pipe.result(f"sanity {mode}", recipe, got, None, None, None, out, status)
    pipe.decide(f"sanity {mode}: {status} ({'-' if got is None else f'{got:.4f}'} vs reference {ref})")
