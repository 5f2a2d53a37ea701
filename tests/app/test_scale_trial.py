"""qat_lightning.app.scale_trial: the seed's fixed-vs-updated scales trial (``qat.scale_trial=true``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat_lightning.app.config_checks import ConfigError
from tests.app.helpers import calibration_checkpoint, run_app

TINY = ("train.limit_train_batches=2", "train.limit_val_batches=2", "qat.max_steps=2")


@pytest.fixture(scope="module")
def calib_ckpt(tmp_path_factory):
    return calibration_checkpoint(tmp_path_factory.mktemp("scale_trial"), ("train.max_epochs=1",), *TINY)


def _qat_state(path: Path) -> tuple[str, int]:
    """The QAT callback's recorded ``scales`` and the number of pinned scale nodes of a checkpoint."""
    ckpt = torch.load(path, weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("QuantizationAwareTraining")]
    pinned = sum(bool(v) for k, v in ckpt["state_dict"].items() if k.endswith("scale_fixed"))
    return state["scales"], pinned


@pytest.mark.parametrize("scales", ["moving", "fixed_input_output"])
def test_trial_runs_moving_and_fixed_input_output(calib_ckpt, tmp_path, scales):
    # the configured qat.scales (used when the trial is skipped) does not leak into the trial's runs
    summary = run_app(
        tmp_path, "stage=qat", "qat.scale_trial=true", f"qat.scales={scales}", "target.value=0.0", *TINY,
        f"ckpt={calib_ckpt}",
    )  # fmt: skip
    ckpts = tmp_path / "checkpoints"
    mode_moving, pinned_moving = _qat_state(ckpts / "qat_scales_moving.ckpt")
    mode_fixed, pinned_fixed = _qat_state(ckpts / "qat_scales_fixed_input_output.ckpt")
    assert (mode_moving, pinned_moving) == ("moving", 0)
    assert mode_fixed == "fixed_input_output" and pinned_fixed > 0
    rows = {r.step: r for r in summary.rows}
    assert list(rows) == ["qat (scales=moving)", "qat (scales=fixed_input_output)", "qat"]
    moving, fixed = rows["qat (scales=moving)"].metric, rows["qat (scales=fixed_input_output)"].metric
    kept = "scales=fixed_input_output" if fixed > moving else "scales=moving"
    assert rows["qat"].metric == max(moving, fixed) and rows["qat"].note == f"kept: {kept}"
    (decision,) = [d for d in summary.decisions if d.startswith("scale trial")]
    assert f"scales=moving {moving:.4f} vs scales=fixed_input_output {fixed:.4f}; kept {kept}" in decision
    assert _qat_state(ckpts / "qat.ckpt")[0] == kept.removeprefix("scales=")


def test_skipped_trial_runs_and_names_qat_scales(calib_ckpt, tmp_path):
    summary = run_app(
        tmp_path, "stage=qat", "qat.scale_trial=true", "qat.scales=fixed_input_output", "target.value=1.01",
        *TINY, f"ckpt={calib_ckpt}",
    )  # fmt: skip
    assert [r.step for r in summary.rows] == ["qat"]
    (decision,) = [d for d in summary.decisions if d.startswith("scale trial skipped")]
    assert decision.endswith("QAT with qat.scales=fixed_input_output")
    mode, pinned = _qat_state(tmp_path / "checkpoints" / "qat.ckpt")
    assert mode == "fixed_input_output" and pinned > 0


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("qat.scales=fixed", "qat.scales=fixed"),
        ("qat.scales=learned", "qat.scales=learned"),
        ("qat.fix_scales=all", "qat.fix_scales=all"),
    ],
)
def test_trial_refuses_scales_it_cannot_compare_before_training(calib_ckpt, tmp_path, override, shown):
    with pytest.raises(ConfigError) as err:
        run_app(
            tmp_path, "stage=qat", "qat.scale_trial=true", override, "target.value=0.0", *TINY,
            f"ckpt={calib_ckpt}",
        )  # fmt: skip
    message = str(err.value)
    assert f"qat.scale_trial=true with {shown}" in message
    assert "allowed with the trial: qat.scales=moving or fixed_input_output" in message
    assert not (tmp_path / "checkpoints").exists()  # nothing trained
