"""2-process CPU DDP (gloo): globally reduced, identical scales on both ranks and one set of reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cb_helpers import LitClassifier, TinyData, make_trainer, scales

from qat_lightning.callbacks import Calibration, PrepareQuantization
from qat_lightning.quant.qconfig.qconfig import get_qconfig
from qat_lightning.quant.qconfig.setter import QconfigSetter

SCRIPT = Path(__file__).with_name("ddp_script.py")
LEARNED_SCRIPT = Path(__file__).with_name("ddp_learned_script.py")
SANITY_SCRIPT = Path(__file__).with_name("ddp_sanity_script.py")


def _launch(script: Path, out_dir: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_ddp_calibration_is_reduced_across_ranks(tmp_path):
    _launch(SCRIPT, tmp_path)

    r0, r1 = (torch.load(tmp_path / f"calib_rank{k}.pt", weights_only=False) for k in (0, 1))
    assert r0["batches"] == r1["batches"] == 4  # each rank read only its half of the 256 samples
    assert r0["scales"].keys() == r1["scales"].keys()
    for name in r0["scales"]:
        torch.testing.assert_close(r0["scales"][name], r1["scales"][name], rtol=0, atol=0, msg=name)

    # global statistics: both ranks counted all 8 batches (4 each) ...
    assert set(r0["seen"].values()) == {8} and r0["seen"] == r1["seen"]
    # ... and equal one process calibrating (minmax) on all 256 samples, with the subprocess's 1 thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lit = LitClassifier()
        setter = QconfigSetter(reference_qconfig=get_qconfig(observer="minmax"))
        make_trainer(tmp_path / "single", [PrepareQuantization(setter), Calibration(None)], max_epochs=0).fit(
            lit, datamodule=TinyData()
        )
    finally:
        torch.set_num_threads(threads)
    single = scales(lit.model)
    for name, value in single.items():
        torch.testing.assert_close(r0["scales"][name], value, rtol=2e-3, atol=0, msg=name)

    # the loaders passed to fit(): sharded by rank and reduced the same way as the datamodule's
    f0, f1 = (torch.load(tmp_path / f"fit_loaders_rank{k}.pt", weights_only=False) for k in (0, 1))
    assert f0["batches"] == f1["batches"] == 4
    for name in r0["scales"]:
        torch.testing.assert_close(f0["scales"][name], r0["scales"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(f1["scales"][name], r0["scales"][name], rtol=0, atol=0, msg=name)

    q0, q1 = (torch.load(tmp_path / f"qat_rank{k}.pt", weights_only=False)["state"] for k in (0, 1))
    for key in q0:
        torch.testing.assert_close(q0[key], q1[key], rtol=0, atol=0, msg=key)

    runs = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert runs == ["version_0", "version_1"]  # one log dir per run, not one per rank
    reports = list(tmp_path.rglob("model_check_result.txt"))
    # one check report, from rank zero of the run that prepared (the QAT run finds the model prepared)
    assert [r.parent.name for r in reports if "single" not in r.parts] == ["version_0"]
    analysis = tmp_path / "run" / "version_0" / "quant_analysis"
    assert (analysis / "badcase.txt").is_file() and not (analysis / "INCOMPLETE").exists()
    assert len(list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))) == 1
    # the export check ran on rank zero over the whole val split (128 samples: 4 batches), not its shard
    check = json.loads((tmp_path / "run" / "version_0" / "export_check.json").read_text())
    assert check["num_batches"] == 4 and check["passed"]


def test_ddp_learned_scales_are_averaged_across_ranks(tmp_path):
    """A first learned-scale QAT run under DDP: the ranks train one set of scales, the checkpoint's."""
    _launch(LEARNED_SCRIPT, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"learned_rank{k}.pt", weights_only=False) for k in (0, 1))
    saved = torch.load(tmp_path / "ckpt" / "final.ckpt", weights_only=False)["state_dict"]
    assert r0["start"] and r0["start"].keys() == r1["start"].keys() == r0["end"].keys()
    for name, start in r0["start"].items():
        torch.testing.assert_close(r1["start"][name], start, rtol=0, atol=0, msg=name)
        assert not torch.equal(r0["last"][name], start), name  # trained (on different shards)
        # after the last step (before on_train_end syncs buffers) and after fit: the same on both ranks
        torch.testing.assert_close(r1["last"][name], r0["last"][name], rtol=0, atol=0, msg=name)
        for rank in (r0, r1):
            torch.testing.assert_close(rank["end"][name], saved[f"model.{name}.scale_param"], rtol=0, atol=0)
    for rank in (r0, r1):  # their own (last) group of the first optimizer, as on resume
        assert rank["groups"] == 2 and rank["own_group"] and not rank["elsewhere"]


def test_ddp_sanity_check_judges_the_drift_of_every_rank_s_shard_together(tmp_path):
    """lr0 drift under DDP: one global judgement (the union of the shards), reported as the run's verdict.

    Rank 1 reads every shifted sample, rank 0 none: alone, rank 1's drift fails and rank 0's passes; over
    the whole set (one process) it passes. Every rank must judge that whole-set drift.
    """
    _launch(SANITY_SCRIPT, tmp_path)
    (tmp_path / "single").mkdir()
    _launch(SANITY_SCRIPT, tmp_path / "single", "1")  # one process, same weights (trained on 1 thread)
    files = (
        tmp_path / "sanity_rank0.json",
        tmp_path / "sanity_rank1.json",
        tmp_path / "single/sanity_rank0.json",
    )
    r0, r1, single = (json.loads(p.read_text()) for p in files)
    assert single["status"] == "PASS" and 0.5 < single["bn_shift"] < 1.0  # the union passes ...
    assert single["bn_samples"] == 256 and single["batches"] == 8
    for rank in (r0, r1):  # ... and so does every rank, with the whole set's numbers
        assert rank["bn_shift"] == pytest.approx(single["bn_shift"], rel=1e-5), rank
        assert rank["range_ratio"] == pytest.approx(single["range_ratio"], rel=1e-5), rank
        assert (rank["bn_samples"], rank["batches"]) == (256, 8), rank
        assert (rank["status"], rank["passed"], rank["run_failed"]) == ("PASS", True, False), rank

    log_dir = tmp_path / "run" / "version_0"
    report = (log_dir / "sanity_check.txt").read_text()
    assert report.startswith("Sanity check (lr0): PASS")
    assert f"mean shift {r0['bn_shift']:.3g} running std" in report and "(mean over 256 values)" in report
    with open(log_dir / "metrics.csv") as f:
        logged = {
            k: float(v) for row in csv.DictReader(f) for k, v in row.items() if k.startswith("sanity/") and v
        }
    assert logged["sanity/lr0/passed"] == 1.0
    assert logged["sanity/lr0/bn_shift"] == pytest.approx(single["bn_shift"], rel=1e-5)
