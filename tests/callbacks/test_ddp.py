"""2-process CPU DDP (gloo): globally reduced, identical scales on both ranks and one set of reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from cb_helpers import LitClassifier, TinyData, make_trainer, scales

from qat_lightning.callbacks import Calibration, PrepareQuantization
from qat_lightning.quant.qconfig.qconfig import get_qconfig
from qat_lightning.quant.qconfig.setter import QconfigSetter

SCRIPT = Path(__file__).with_name("ddp_script.py")
LEARNED_SCRIPT = Path(__file__).with_name("ddp_learned_script.py")


def _launch(script: Path, out_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out_dir)], env=env, capture_output=True, text=True, timeout=240
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
