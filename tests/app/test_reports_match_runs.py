"""What summary.md, lr_probe.md and the ignored-override warnings say is what the stages ran.

Each report is checked against a re-computation from the run itself: the LR probe's steps from its
TensorBoard, the calibration batches and loader from the checkpoint's ``Calibration`` state, the precision
ratios from ``dtype_op_shares`` / ``check_model`` of the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qat_lightning.app.checkpoints import read_checkpoint_info
from qat_lightning.app.config_checks import ignored_overrides
from qat_lightning.app.schema import StageName
from qat_lightning.ptq import PTQ_CHECKPOINT_KEY
from tests.app.helpers import run_app

PROBE_STEPS = 14  # more than one epoch of the example's training data at batch size 128 (12 batches)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reports_float")
    run_app(run_dir, "stage=float", "train.max_epochs=1")
    return run_dir / "checkpoints" / "float.ckpt"


@pytest.fixture(scope="module")
def ptq_calibration(tmp_path_factory, float_ckpt) -> Path:
    """``stage=calibration recipe=int8 ptq=bias_correction``: its checkpoint."""
    run_dir = tmp_path_factory.mktemp("reports_ptq")
    run_app(run_dir, "stage=calibration", "recipe=int8", "ptq=bias_correction", f"ckpt={float_ckpt}")
    return run_dir / "checkpoints" / "calibration.ckpt"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, ptq_calibration):
    """``stage=qat`` with a two-LR probe of more steps than one epoch has (and an unread calibration key)."""
    run_dir = tmp_path_factory.mktemp("reports_probe")
    summary = run_app(
        run_dir,
        "stage=qat",
        "qat.lr_probe.lrs=[1.0e-3,1.0e-2]",
        f"qat.lr_probe.steps={PROBE_STEPS}",
        "qat.max_steps=2",
        "calibration.num_batches=1",
        f"ckpt={ptq_calibration}",
    )
    return run_dir, summary


@pytest.fixture(scope="module")
def j6p_calibration(tmp_path_factory, float_ckpt):
    """``stage=calibration`` on j6p with the Calibration callback's own batch count and loader."""
    run_dir = tmp_path_factory.mktemp("reports_j6p")
    summary = run_app(
        run_dir,
        "stage=calibration",
        "chip=j6p",
        "recipe=gemm_int16_other_fp16",
        "callbacks.calibration.num_batches=2",
        "callbacks.calibration.dataloader=val",
        f"ckpt={float_ckpt}",
    )
    return run_dir, summary


def _calibration_state(ckpt: dict) -> tuple[int, str]:
    """The batches and loader the checkpoint's ``Calibration`` state recorded."""
    (state,) = [s for k, s in ckpt["callbacks"].items() if k.startswith("Calibration{")]
    return state["batches_used"], state["dataloader"]


def _last_step(log_dir: Path, tag: str) -> int:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return max(e.step for e in acc.Scalars(tag))


# ----------------------------------------------------------------------------------------------- item 1
def test_lr_probe_reports_the_optimizer_steps_each_candidate_ran(probe_run):
    run_dir, summary = probe_run
    probe_dir = next(run_dir.glob("*_lr_probe"))
    # the final validation of each candidate is logged at its trainer's global_step
    ran = {lr: _last_step(probe_dir / f"lr_{lr}", "val/acc") for lr in ("0.001", "0.01")}
    assert ran == {"0.001": PROBE_STEPS, "0.01": PROBE_STEPS}  # one epoch (12 steps) used to end it
    rows = {r.step: r for r in summary.rows if r.step.startswith("lr probe")}
    assert [rows[f"lr probe {lr}"].note.split(",")[0] for lr in ran] == [f"{n} steps" for n in ran.values()]
    header = (probe_dir / "lr_probe.md").read_text().splitlines()[0]
    assert header == f"# QAT LR probe ({PROBE_STEPS} steps each, constant LR)"
    (decision,) = [d for d in summary.decisions if d.startswith("QAT LR probe")]
    assert decision.startswith(f"QAT LR probe ({PROBE_STEPS} steps each, fixed LR)")


# ----------------------------------------------------------------------------------------------- item 2
def test_calibration_line_reports_what_the_calibration_callback_used(j6p_calibration):
    run_dir, summary = j6p_calibration
    ckpt, info = read_checkpoint_info(run_dir / "checkpoints" / "calibration.ckpt")
    batches, loader = _calibration_state(ckpt)
    assert (batches, loader) == (2, "val")  # callbacks.calibration.*, not calibration.num_batches=4
    recipe = info.recipe
    expected = f"{recipe.observer} (weights {recipe.weight_observer}), {batches} batches of the {loader} data"
    assert summary.facts["calibration"] == expected
    assert f"- **calibration**: {expected}" in (run_dir / "summary.md").read_text()


# ----------------------------------------------------------------------------------------------- item 4
def test_overrides_a_stage_does_not_read_are_named(probe_run):
    troubleshoot_unread = [
        "qat.max_epochs=2",
        "qat.max_steps=5",
        "qat.lr_probe.lrs=[1.0e-3]",
        "qat.lr_probe.steps=3",
        "qat.scale_trial=true",
        "train.limit_train_batches=3",
    ]
    lines = ignored_overrides(StageName.troubleshoot, troubleshoot_unread)
    assert [line.split(":")[0] for line in lines] == troubleshoot_unread
    read = ["qat.lr=1.0e-3", "qat.scheduler=constant", "qat.scales=fixed", "sanity.steps=3", "recipe=int16"]
    assert ignored_overrides(StageName.troubleshoot, read) == []
    assert ignored_overrides(StageName.calibration, ["sanity.steps=3", "sanity.mode=float"]) == [
        "sanity.steps=3: stage=calibration does not read sanity.steps"
    ]
    assert ignored_overrides(StageName.qat, ["calibration.num_batches=1", "qat.lr_probe.steps=3"]) == [
        "calibration.num_batches=1: stage=qat does not read calibration.num_batches"
    ]
    # what ran: the QAT stage given calibration.num_batches=1 calibrated nothing (the checkpoint was)
    run_dir, _ = probe_run
    qat_ckpt = torch.load(run_dir / "checkpoints" / "qat.ckpt", map_location="cpu", weights_only=False)
    states = [s for k, s in qat_ckpt["callbacks"].items() if k.startswith("Calibration{")]
    assert states and all(s["batches_used"] == 0 for s in states)


# ----------------------------------------------------------------------------------------------- item 5
def test_ptq_is_read_by_the_stages_that_run_it(ptq_calibration):
    assert ignored_overrides(StageName.calibration, ["ptq=bias_correction"]) == []
    assert ignored_overrides(StageName.pipeline, ["ptq=adaround"]) == []
    assert ignored_overrides(StageName.qat, ["ptq=adaround"]) == ["ptq=adaround: stage=qat does not read ptq"]
    # what ran: stage=calibration ptq=bias_correction corrected the biases (their float values recorded)
    ckpt = torch.load(ptq_calibration, map_location="cpu", weights_only=False)
    assert ckpt.get(PTQ_CHECKPOINT_KEY, {}).get("model")


# ----------------------------------------------------------------------------------------------- item 6
def test_summary_ratios_are_the_model_checks_dtype_shares(j6p_calibration):
    import qat_lightning as ql
    from qat_lightning.app.session import Session
    from qat_lightning.cli import compose, make_factories, to_app_config
    from qat_lightning.quant.preparation.model_check import dtype_op_shares
    from tests.app.helpers import FAST

    run_dir, summary = j6p_calibration
    (row,) = summary.rows
    cfg = compose([*FAST, "chip=j6p", "recipe=gemm_int16_other_fp16"])
    session = Session(to_app_config(cfg), run_dir / "recheck", make_factories(cfg))
    lit, _ = session.load_quantized(run_dir / "checkpoints" / "calibration.ckpt")
    shares = dtype_op_shares(lit.model)
    rows = {r.dtype: r.ops for r in ql.check_model(lit.model).dtype_summary}
    total = sum(rows.values())
    assert (row.int16_ratio, row.fp16_ratio) == (shares["qint16"], shares["float16"])
    assert (row.int16_ratio, row.fp16_ratio) == (rows["qint16"] / total, rows["float16"] / total)
    assert row.fp16_ratio == pytest.approx(0.5) and row.int16_ratio == pytest.approx(0.5)  # gemms int16
    assert row.cost == pytest.approx(4.0)  # README: gemm double-int16 + other fp16 costs 4.00 x int8
