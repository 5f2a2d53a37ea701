"""What each ``stage=`` does, step by step.

``stage=pipeline`` is in ``pipeline_stage.py``; ``pipeline.py`` describes the pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qat_lightning.app.advice_steps import dual_int16_advice, fp16_advice
from qat_lightning.app.pipeline import Pipeline
from qat_lightning.app.pipeline_stage import pipeline_stage, sanity_step
from qat_lightning.app.recipes import Recipe, recipe_from_conf
from qat_lightning.app.schema import RecipeConf
from qat_lightning.app.stage_reads import fp16_step_wanted
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
    fp16_wanted = fp16_step_wanted(conf)  # the ignored-override warning reads the same rules
    if fp16_wanted and conf.fp16_topk is None and pipe.cfg.pipeline.fp16_max < 1:
        pipe.decide("int16/fp16: pipeline.fp16_max=0: no op moved to fp16 (no search)")
        fp16_wanted = False
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
            lit = _prepared(pipe, float_ckpt, recipe)  # its ops: the rows the search would count
            outcome = pipe.int16_step(
                lit, given, target, conf, recipe.other is not None, pipe.session.run_dir
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


def _prepared(pipe: Pipeline, float_ckpt: Path, recipe: Recipe) -> Any:
    """Return the float model prepared with ``recipe``, not calibrated (its ops, nothing evaluated)."""
    from qat_lightning.callbacks.prepare import prepare_submodule

    s, p = pipe.session, pipe.cfg.prepare
    lit, _ = s.load_float(float_ckpt)
    prepare_submodule(
        lit,
        recipe.setter(),
        s.example_inputs(lit),
        submodule=p.submodule,
        method=p.method.value,
        qat_mode=p.qat_mode.value,
        int_bias=p.int_bias,
    )
    return lit


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
    from qat_lightning.ptq import float_reference
    from qat_lightning.quant.nodes.fake_quantize import fake_quant_disabled

    net = getattr(lit, pipe.cfg.prepare.submodule)
    with float_reference(net), fake_quant_disabled(net):  # ptq=: the float values it overwrote
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
        sanity_step(pipe, mode, calib, reference, info.recipe)
    return pipe.finish(f"qat-lightning: QAT ({info.recipe.name if info.recipe else '?'} on {pipe.chip})")


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
