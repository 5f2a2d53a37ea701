"""qat_lightning.app.config_checks: values out of range exit 2 at compose; ignored overrides are warned."""

from __future__ import annotations

import pytest

from qat_lightning.app.config_checks import ConfigError, ignored_overrides
from qat_lightning.app.schema import StageName
from qat_lightning.cli import compose, to_app_config
from tests.test_cli import cli


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("qat.lr=-1", "qat.lr=-1.0: must be a number > 0"),
        ("calibration=percentile", None),
        ("calibration.num_batches=0", "calibration.num_batches=0: must be an int >= 1"),
        ("target.ratio_of_float=2.0", "target.ratio_of_float=2.0: must be a share in (0, 1]"),
        ("+recipe.module_names.conv={threshold:-1}", "threshold must be a finite number > 0, got -1"),
        ("+recipe.module_names.conv={dtype:qint12}", "unknown quantization dtype 'qint12'; allowed: qint8"),
        ("prepare.submodule=''", "prepare.submodule='': must be an attribute path"),
        ("sanity.steps=0", "sanity.steps=0: must be an int >= 1"),
        ("qat.lr_probe.lrs=[1.0e-3,-1]", "qat.lr_probe.lrs=[0.001, -1.0]: every LR must be a number > 0"),
        ("analysis.metrics=[COSINE,FOO]", "unknown ['FOO']; allowed: "),
    ],
)
def test_out_of_range_values_are_refused_at_compose(override, expected):
    if expected is None:  # a valid override composes
        to_app_config(compose([override]))
        return
    with pytest.raises(ConfigError) as err:
        to_app_config(compose([override]))
    assert expected in str(err.value)


def test_percentile_out_of_range_names_key_value_and_range():
    with pytest.raises(ConfigError) as err:
        to_app_config(compose(["calibration=percentile", "calibration.observer_kwargs.percentile=150"]))
    assert "calibration.observer_kwargs={'percentile': 150" in str(err.value)
    assert "percentile must be a number in (0, 100]" in str(err.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        to_app_config(compose(["qat.lr=-1", "calibration.num_batches=0"]))
    assert "2 problem(s)" in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["qat.lr=-1", "calibration.num_batches=0", "target.ratio_of_float=2.0", "recipe.activation=qint12"],
)
def test_cli_exits_2_without_a_traceback(override):
    result = cli("--cfg", "job", override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "qat-lightning: error:" in result.stderr and override.split("=")[0] in result.stderr
    assert "Traceback" not in result.stderr


def test_ignore_nonfinite_is_reachable_from_hydra():
    app = to_app_config(compose(["+calibration.observer_kwargs.ignore_nonfinite=true"]))
    assert app.calibration.observer_kwargs == {"ignore_nonfinite": True}


def test_ignored_overrides_are_named():
    lines = ignored_overrides(
        StageName.float, ["qat.lr=0.5", "train.max_epochs=2", "+data.batch_size=8", "hydra.run.dir=x"]
    )
    assert lines == ["qat.lr=0.5: stage=float does not read qat.lr"]
    assert ignored_overrides(StageName.qat, ["recipe=int16", "qat.lr=0.5"]) == [
        "recipe=int16: stage=qat does not read recipe"
    ]
    partial = ignored_overrides(StageName.pipeline, ["recipe=int16", "sanity=lr0"])
    assert partial[0] == "recipe=int16: stage=pipeline reads only recipe.module_names of it"
    assert partial[1] == "sanity=lr0: stage=pipeline reads only sanity.tolerance, sanity.steps of it"


def test_cli_warns_about_ignored_overrides():
    result = cli("--cfg", "job", "stage=float", "qat.lr=0.5", "recipe=int16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: ignored override qat.lr=0.5: stage=float does not read qat" in result.stderr
    assert "warning: ignored override recipe=int16" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["+callbacks.qat.scales=fixed"],
            "callbacks.qat.scales='fixed' conflicts with qat.scales=moving: the stage passes scales=moving",
        ),
        (
            ["+callbacks.qat.scales=learned", "qat.scales=fixed_input_output"],
            "callbacks.qat.scales='learned' conflicts with qat.scales=fixed_input_output",
        ),
        (
            ["+callbacks.qat.fix_scales=all", "qat.fix_scales=input_output"],
            "callbacks.qat.fix_scales='all' conflicts with qat.fix_scales=input_output",
        ),
        (
            ["+callbacks.qat.scales=moving", "qat.scale_trial=true"],
            "callbacks.qat.scales='moving' conflicts with qat.scale_trial=true",
        ),
        (
            ["+callbacks.qat.fix_scales=none"],
            "callbacks.qat.fix_scales='none': allowed: null, input_output, all",
        ),
        (
            ["qat.fix_scales=input_output", "qat.scales=fixed"],
            "qat.fix_scales=input_output contradicts qat.scales=fixed: set only qat.scales",
        ),
        (
            ["+callbacks.sanity.mode=float"],
            "callbacks.sanity.mode='float': the stage passes mode at run time",
        ),
    ],
)
def test_callback_keys_the_stage_sets_at_run_time_are_refused(overrides, expected):
    with pytest.raises(ConfigError) as err:
        to_app_config(compose(["stage=qat", *overrides]))
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage=qat", "+callbacks.qat.scales=fixed", "qat.scales=fixed"],
        ["stage=qat", "+callbacks.qat.fix_scales=input_output", "qat.scales=fixed_input_output"],
        ["stage=qat", "qat.fix_scales=all", "qat.scales=fixed"],
        ["stage=float", "+callbacks.qat.scales=fixed"],  # a stage that builds no callback: only warned
    ],
)
def test_agreeing_scale_keys_compose(overrides):
    to_app_config(compose(overrides))


def test_cli_refuses_a_conflicting_callback_scale_mode():
    result = cli("--cfg", "job", "stage=qat", "+callbacks.qat.scales=fixed")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "callbacks.qat.scales='fixed' conflicts with qat.scales=moving" in result.stderr
    assert "set qat.scales=fixed" in result.stderr and "Traceback" not in result.stderr
