"""The pipeline tries ``ptq=`` after all-int8 misses the target, before the int16 search, and says so."""

from __future__ import annotations

from pathlib import Path

from tests.app.helpers import run_app


def test_pipeline_tries_ptq_before_the_int16_search(tmp_path: Path) -> None:
    run_app(
        tmp_path,
        "ptq=equalize_bias_correction",
        "pipeline.sanity=false",
        "target.value=1.01",  # unreachable (accuracy <= 1): every step runs and is reported
    )
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "+ ptq=equalize_bias_correction" in summary  # the step's row
    decision = next(line for line in summary.splitlines() if "ptq=equalize_bias_correction on" in line)
    assert "->" in decision and ("kept" in decision or "dropped" in decision)
    assert summary.index("ptq=equalize_bias_correction on") < summary.index("minimal int16 ratio")
    assert list((tmp_path / "checkpoints").glob("calibration_int8*_ptq.ckpt"))
    assert "| qat |" in summary  # QAT starts from the ptq checkpoint (same state_dict keys)
