"""What each ``stage=`` does, step by step (see ``pipeline.py`` for the pipeline's description)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qat_lightning.app.advice_steps import dual_int16_advice, fp16_advice
from qat_lightning.app.pipeline import Pipeline
from qat_lightning.app.recipes import Recipe, recipe_from_conf
from qat_lightning.app.schema import RecipeConf
from qat_lightning.app.summary import Summary

__all__ = [
    "analysis_stage",
    "calibration_stage",
    "float_stage",
    "pipeline_stage",
    "qat_stage",
    "tune_recipe",
]

from qat_lightning.files import write_atomic

log = logging.getLogger("qat_lightning")

_FP16_RECIPES = ("int16_fp16", "int8_int16_fp16")


def float_stage(pipe: Pipeline) -> Summary:
    """Train the float model: ``checkpoints/float.ckpt``."""
    out = pipe.step("float", "float training", own_dir=False)
    lit, metric, ckpt, steps = pipe.session.train_float(out)
    pipe.result("float", None, metric, metric, lit, ckpt, out, f"{steps} steps")
    return pipe.finish("qat-lightning: float training")


def tune_recipe(
    pipe: Pipeline, conf: RecipeConf, recipe: Recipe, float_ckpt: Path, float_metric: float
) -> Recipe:
    """Decide what a tuned recipe leaves open (fp16 ops, int16 rows) with the seed's searches.

    Fixed recipes come back unchanged. ``int16_fp16`` / ``int8_int16_fp16`` without ``fp16_ops`` search
    the fp16 ops on the all-int16 model; mixed recipes then search (or take ``int16_ratio`` of) the int16
    rows on the base model's sensitivity.
    """
    target = pipe.session.target(float_metric)
    fp16_wanted = conf.name.value in _FP16_RECIPES and not recipe.fp16_ops and conf.fp16_topk != 0
    if fp16_wanted:
        _, high = pipe.base_recipe("int16")
        lit, metric, _, out = pipe.calibrate(
            "calibration_int16",
            "calibration int16 (for fp16)",
            float_ckpt,
            high,
            float_metric,
            "calibration_int16",
        )
        tables = pipe.analyze(lit, "analysis_int16", "analysis of int16 (fp16 candidates)")
        recipe = recipe.replace(fp16_ops=pipe.fp16_step(lit, tables, target, conf, pipe.current_dir))
    if conf.mixed:
        from qat_lightning.app.tuning import load_sensitivity_table

        given = [load_sensitivity_table(Path(conf.sensitivity_table))] if conf.sensitivity_table else []
        if given and conf.int16_ratio is not None:  # nothing to measure: the rows come from the table
            outcome = pipe.int16_step(
                None, given, target, conf, recipe.other is not None, pipe.session.run_dir
            )
            return recipe.replace(raised=outcome.chosen)
        base = recipe.replace(name=f"{recipe.name} base")
        lit, metric, _, out = pipe.calibrate(
            "calibration_base",
            f"calibration {recipe.name} base",
            float_ckpt,
            base,
            float_metric,
            "calibration_base",
        )
        if given:
            tables = given
            log.info("sensitivity from recipe.sensitivity_table=%s", conf.sensitivity_table)
        else:
            tables = pipe.analyze(lit, "analysis_base", "analysis (sensitivity for the int16 ratio)")
        gemm_only = recipe.other is not None
        outcome = pipe.int16_step(lit, tables, target, conf, gemm_only, pipe.current_dir)
        recipe = recipe.replace(raised=outcome.chosen)
    return recipe


def calibration_stage(pipe: Pipeline) -> Summary:
    """``stage=calibration``: prepare + calibrate the float checkpoint with ``recipe``."""
    cfg = pipe.cfg
    recipe = recipe_from_conf(cfg.recipe, cfg.chip, cfg.calibration)  # the chip rules first: fail fast
    float_ckpt = pipe.resolve_ckpt("float")
    float_metric = pipe.float_metric_of(float_ckpt, pipe.session.run_dir)
    recipe = tune_recipe(pipe, cfg.recipe, recipe, float_ckpt, float_metric)
    ptq = cfg.ptq.enabled
    lit, _, _, out = pipe.calibrate(
        "calibration",
        f"calibration {recipe.name}" + (f" + ptq={cfg.ptq.name}" if ptq else ""),
        float_ckpt,
        recipe,
        float_metric,
        "calibration",
        own_dir=False,
        ptq=ptq,
    )
    _float_check(pipe, lit, float_metric, out)
    return pipe.finish(f"qat-lightning: calibration ({recipe.name} on {pipe.chip})")


def _float_check(pipe: Pipeline, lit: Any, float_metric: float, out: Path) -> None:
    """``sanity=float`` after calibration: fake quant off must give the float metric back."""
    if pipe.cfg.sanity.mode.value != "float":
        if pipe.cfg.sanity.mode.value == "lr0":
            log.info("sanity=lr0 applies to QAT (stage=qat / pipeline); nothing to check after calibration")
        return
    from qat_lightning.quant.nodes.fake_quantize import fake_quant_disabled

    with fake_quant_disabled(getattr(lit, pipe.cfg.prepare.submodule)):
        got = pipe.session.validate(lit, out)
    ok = abs(got - float_metric) <= pipe.cfg.sanity.tolerance
    text = (
        f"Sanity check (float, after calibration): {'PASS' if ok else 'FAIL'}\n"
        f"monitor: {pipe.session.monitor}\n"
        f"reference (float model): {float_metric:.6g}\n"
        f"result (calibration model, fake quant off): {got:.6g}\n"
    )
    from qat_lightning.app.checkpoints import is_rank_zero

    if is_rank_zero():
        write_atomic(out / "sanity_check.txt", text)
    pipe.decide(
        f"float sanity check after calibration: {'PASS' if ok else 'FAIL'} "
        f"({got:.4f} vs float {float_metric:.4f})"
    )


def qat_stage(pipe: Pipeline) -> Summary:
    """``stage=qat``: QAT from a calibration checkpoint (its recorded recipe), then ``sanity``."""
    from qat_lightning.app.checkpoints import read_checkpoint_info
    from qat_lightning.app.lr_probe import run_lr_probe
    from qat_lightning.app.scale_trial import run_qat

    calib = pipe.resolve_ckpt("calibration")
    _, calib_info = read_checkpoint_info(calib)
    recipe = None if calib_info is None else calib_info.recipe
    lr = run_lr_probe(pipe, calib, recipe)
    _, _, _, info = run_qat(
        pipe,
        calib,
        recipe,
        None if calib_info is None else calib_info.metric,
        None if calib_info is None else calib_info.float_metric,
        lr,
        "quantization-aware training",
        own_dir=False,
    )
    mode = pipe.cfg.sanity.mode.value
    if mode != "none":
        reference = info.metric if mode == "lr0" else info.float_metric
        _sanity(pipe, mode, calib, reference, info.recipe)
    return pipe.finish(f"qat-lightning: QAT ({info.recipe.name if info.recipe else '?'} on {pipe.chip})")


def _sanity(pipe: Pipeline, mode: str, calib: Path, reference: float | None, recipe: Recipe | None) -> None:
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


def analysis_stage(pipe: Pipeline) -> Summary:
    """``stage=analysis``: bad cases, per-layer comparison, sensitivity of a calibration checkpoint."""
    calib = pipe.resolve_ckpt("calibration")
    out = pipe.step("analysis", "analysis", own_dir=False)
    lit, info = pipe.session.load_quantized(calib, out)
    metric = pipe.session.validate(lit, out)
    tables = pipe.session.analyze(lit, out)
    dual_int16_advice(pipe, lit, tables, out)
    from qat_lightning.chips import get_chip

    if get_chip(pipe.chip).gemm_double_int16:  # j6p: non-gemm ops run fp16
        fp16_advice(pipe, lit, out)
    pipe.result("analysis (calibration model)", info.recipe, metric, info.float_metric, lit, None, out)
    for table in tables:
        top = ", ".join(f"{r.op_name}/{r.sensitive_type} ({r.metric:.3g})" for r in table.rows[:5])
        pipe.decide(f"most sensitive ({table.metric_name}, output {table.output_name}): {top}")
    return pipe.finish(f"qat-lightning: analysis ({info.recipe.name if info.recipe else '?'} on {pipe.chip})")


def pipeline_stage(pipe: Pipeline) -> Summary:
    """``stage=pipeline``: the seed's tuning flow for the chip (module docstring of ``pipeline.py``)."""
    from qat_lightning.chips import get_chip

    s, cfg = pipe.session, pipe.cfg
    j6p = get_chip(pipe.chip).gemm_double_int16
    # 1. float
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
    # 2. high precision
    high_name, low_name = ("gemm_int16_other_fp16", "gemm_int8_other_fp16") if j6p else ("int16", "int8")
    mixed_name = "gemm_int8_other_fp16" if j6p else "int8_int16"
    _, high = pipe.base_recipe(high_name)
    lit, m_high, ckpt_high, _ = pipe.calibrate(
        "calibration_high",
        f"calibration {high_name}",
        float_ckpt,
        high,
        float_metric,
        f"calibration_{high_name}",
    )
    fp16_ops: tuple[str, ...] = ()
    if s.meets(m_high, target):
        pipe.decide(
            f"{high_name} {m_high:.4f} meets the target {target:.4f}: "
            f"go on to {'gemm int8' if j6p else 'all-int8'}"
        )
    elif j6p:
        tables = pipe.analyze(lit, "analysis_high", f"analysis of {high_name} (below target)")
        fp16_advice(pipe, lit, pipe.current_dir)
        top = ", ".join(f"{r.op_name}/{r.sensitive_type}" for t in tables for r in t.rows[:5])
        pipe.decide(
            f"{high_name} {m_high:.4f} is below the target {target:.4f}: the most sensitive ops are {top}; "
            "the seed's fixes (fixed scale for gemm inputs, int16 + fixed scale for coordinates, input "
            "scaling or fp32 for non-gemm ops) are left to recipe.module_names; continuing with the gemm "
            "int8/int16 tuning"
        )
    else:
        pipe.decide(
            f"all-int16 {m_high:.4f} is below the target {target:.4f}: "
            f"int16/fp16 tuning (fp16 is slow on {pipe.chip})"
        )
        conf_fp16, _ = pipe.base_recipe("int16_fp16")
        tables = pipe.analyze(lit, "analysis_int16", "analysis of int16 (fp16 candidates)")
        dual_int16_advice(pipe, lit, tables, pipe.current_dir)
        fp16_ops = pipe.fp16_step(lit, tables, target, conf_fp16, pipe.current_dir)
        if fp16_ops:
            _, mixed16 = pipe.base_recipe("int16_fp16", fp16_ops)
            pipe.calibrate(
                "calibration_int16_fp16",
                "calibration int16/fp16",
                float_ckpt,
                mixed16,
                float_metric,
                "calibration_int16_fp16",
            )
    # 4. low precision
    mixed_conf, _ = pipe.base_recipe(mixed_name)
    _, low = pipe.base_recipe(low_name, fp16_ops)
    if fp16_ops:
        low = low.replace(name=f"{low_name}_fp16")
    low_title = "gemm int8 + other fp16" if j6p else ("all-int8" + (" + fp16 ops" if fp16_ops else ""))
    lit, m_low, ckpt_low, _ = pipe.calibrate(
        "calibration_low",
        f"calibration {low_title}",
        float_ckpt,
        low,
        float_metric,
        f"calibration_{low.name}",
    )
    use_ptq = False
    if not s.meets(m_low, target) and cfg.ptq.enabled:
        lit, m_low, ckpt_low, use_ptq = _ptq_step(pipe, float_ckpt, low, low_title, float_metric, target,
                                                  (lit, m_low, ckpt_low))
    chosen, chosen_ckpt, chosen_metric = low, ckpt_low, m_low
    if s.meets(m_low, target):
        pipe.decide(f"{low_title} {m_low:.4f} meets the target {target:.4f}: no int16 needed")
    else:
        pipe.decide(
            f"{low_title} {m_low:.4f} is below the target {target:.4f}: analysis + minimal int16 ratio"
        )
        tables = pipe.analyze(
            lit, "analysis_low", f"analysis of {low_title}: bad cases, per layer, sensitivity"
        )
        outcome = pipe.int16_step(lit, tables, target, mixed_conf, j6p, pipe.current_dir)
        if outcome.chosen:
            chosen = low.replace(name=mixed_name + ("_fp16" if fp16_ops else ""), raised=outcome.chosen)
        else:
            pipe.decide(f"nothing to raise: keeping {low.name} ({m_low:.4f})")
    if chosen.raised:
        _, chosen_metric, chosen_ckpt, _ = pipe.calibrate(
            "calibration_mixed",
            f"calibration {chosen.name} (chosen)" + (f" + ptq={cfg.ptq.name}" if use_ptq else ""),
            float_ckpt,
            chosen,
            float_metric,
            "calibration",
            ptq=use_ptq,
        )
    if chosen_ckpt != pipe.session.ckpt_dir / "calibration.ckpt":  # the chosen one under the standard name
        import shutil

        from qat_lightning.app.checkpoints import barrier, is_rank_zero

        if is_rank_zero():
            shutil.copyfile(chosen_ckpt, pipe.session.ckpt_dir / "calibration.ckpt")
        barrier()
        chosen_ckpt = pipe.session.ckpt_dir / "calibration.ckpt"
    # 6. QAT
    qat_lit = None
    if cfg.pipeline.qat:
        from qat_lightning.app.lr_probe import run_lr_probe

        lr = run_lr_probe(pipe, chosen_ckpt, chosen)
        shown = cfg.qat.lr if lr is None else lr
        from qat_lightning.app.scale_trial import run_qat

        title = f"QAT of {chosen.name} (no-warmup LR {shown}, {cfg.qat.scheduler.value})"
        qat_lit, m_qat, _, _ = run_qat(pipe, chosen_ckpt, chosen, chosen_metric, float_metric, lr, title)
        verdict = "meets" if s.meets(m_qat, target) else "is below"
        pipe.decide(f"QAT {m_qat:.4f} {verdict} the target {target:.4f} (calibration {chosen_metric:.4f})")
    # 7. sanity
    if cfg.pipeline.sanity:
        _sanity(pipe, "lr0", chosen_ckpt, chosen_metric, chosen)
        _sanity(pipe, "float", chosen_ckpt, float_metric, chosen)
    if cfg.export.enabled:  # 8. ONNX export of the chosen model (QAT if it ran), checked in onnxruntime
        from qat_lightning.app.export import export_chosen

        export_chosen(pipe, qat_lit, chosen_ckpt, chosen)
    return pipe.finish(f"qat-lightning pipeline on {pipe.chip}", {"chosen recipe": chosen.describe()})


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
