"""Advice steps of the analysis stages: the seed's dual-int16, fp16 and shared-module diagnoses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qat_lightning.app.pipeline import Pipeline
from qat_lightning.files import write_atomic

__all__ = ["dual_int16_advice", "fp16_advice"]


def dual_int16_advice(pipe: Pipeline, lit: Any, tables: list[Any], out: Path) -> Any:
    """Write ``quant_analysis/dual_int16.txt`` and ``shared_modules.txt`` (the seed's advice); decide."""
    from qat_lightning.analysis.advice.int16 import diagnose_dual_int16, render_dual_int16
    from qat_lightning.app.checkpoints import is_rank_zero

    if not tables:
        return None
    model = getattr(lit, pipe.cfg.prepare.submodule)
    diagnosis = diagnose_dual_int16(tables, model, chip=pipe.chip)
    path = out / "quant_analysis" / "dual_int16.txt"
    if is_rank_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, render_dual_int16(diagnosis))
    if diagnosis.findings:
        dual = ", ".join(
            f"{f.op_name} (act {f.activation_metric:.4f}, weight {f.weight_metric:.4f})"
            for f in diagnosis.dual
        )
        single = ", ".join(f"{f.op_name}/{f.kind}" for f in diagnosis.single)
        pipe.decide(
            f"dual-int16 diagnosis ({path}): needs int16 on both inputs: {dual or 'none'}; "
            f"one type only (configuration / fixed scale suspects): {single or 'none'}"
        )
    _shared_module_advice(pipe, model, out)
    return diagnosis


def fp16_advice(pipe: Pipeline, lit: Any, out: Path) -> Any:
    """Write ``quant_analysis/fp16_diagnosis.txt`` (j6p: fp16 overflow / precision per op); decide."""
    from qat_lightning.analysis.advice.fp16 import diagnose_fp16, render_fp16
    from qat_lightning.app.checkpoints import is_rank_zero

    model = getattr(lit, pipe.cfg.prepare.submodule)
    diagnosis = diagnose_fp16(model, pipe.session.example_inputs(lit))
    path = out / "quant_analysis" / "fp16_diagnosis.txt"
    if is_rank_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, render_fp16(diagnosis))
    if diagnosis.findings:
        found = ", ".join(f"{f.op_name}/{f.kind} ({f.value:.4g})" for f in diagnosis.findings)
        pipe.decide(f"fp16 diagnosis ({path}): {found}; template lines in the file")
    return diagnosis


def _shared_module_advice(pipe: Pipeline, model: Any, out: Path) -> None:
    """Write ``quant_analysis/shared_modules.txt`` (cases B / C from the call sites' observers)."""
    from qat_lightning.analysis.advice.shared import render_shared_module_advice, shared_module_advice
    from qat_lightning.app.checkpoints import is_rank_zero

    advice = shared_module_advice(model)
    if not advice.findings:
        return
    path = out / "quant_analysis" / "shared_modules.txt"
    if is_rank_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, render_shared_module_advice(advice))
    verdicts = ", ".join(
        f"{f.module_path}: case {f.case} (max|x| ratio {f.range_ratio:.4f})" for f in advice.findings
    )
    pipe.decide(f"shared modules ({path}): {verdicts}")
