"""`qat-lightning` / `python -m qat_lightning` as a user runs it: exit codes, messages, the run dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "qat_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_console_script_is_installed():
    assert shutil.which("qat-lightning") is not None
    main = (ROOT / "qat_lightning" / "__main__.py").read_text()
    assert "from qat_lightning.cli import main" in main


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["chip=j6x"], "Available options in 'chip'"),
        (["qat.lrr=0.1"], "did you mean 'lr'"),
        (["chip.name=j6q"], "expected one of [j6e, j6m, j6p]"),
    ],
)
def test_override_errors(args, expected):
    result = cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_chip_rule_violation_exits_with_the_rule(tmp_path):
    result = cli("chip=j6m", "recipe=gemm_int16_other_fp16", "stage=calibration", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "j6m: gemm cannot take int16 on both activation and weight" in result.stderr


def test_print_config_without_running():
    result = cli(
        "--cfg", "job", "chip=j6p", "recipe=gemm_int8_other_fp16", "stage=calibration", "calibration=kl"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "name: j6p" in result.stdout
        and "observer: kl" in result.stdout
        and "name: calibration" in result.stdout
    )


@pytest.fixture(scope="module")
def float_run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_float")
    result = cli(
        "stage=float",
        "train.max_epochs=1",
        "+data.batch_size=256",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_float_stage_run_dir(float_run_dir):
    run_dir, result = float_run_dir
    for path in ("summary.md", "qat_lightning.log", ".hydra/config.yaml", "checkpoints/float.ckpt"):
        assert (run_dir / path).is_file(), path
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "step 1: float training" in (run_dir / "qat_lightning.log").read_text()
    assert "qat-lightning: float training" in result.stdout  # the summary table, printed


def test_ddp_calibration_on_two_cpu_processes(float_run_dir, tmp_path):
    float_dir, _ = float_run_dir
    result = cli(
        "trainer=ddp_cpu",
        "stage=calibration",
        "recipe=int8",
        "+data.batch_size=64",
        "progress=false",
        f"ckpt={float_dir / 'checkpoints' / 'float.ckpt'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "calibration.ckpt").is_file()
    assert (tmp_path / "model_check_result.txt").is_file()
    assert (tmp_path / "train_ddp_process_1.log").is_file()  # the second rank ran
    assert (tmp_path / "summary.md").read_text().count("| calibration int8 |") == 1  # written once, by rank 0


def test_default_run_dir_is_outputs_stage(tmp_path):
    result = cli("stage=qat", "progress=false", cwd=tmp_path)  # no checkpoint: refused before training
    assert result.returncode == 2, result.stderr[-2000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["qat"]
    (run_dir,) = (tmp_path / "outputs" / "qat").iterdir()
    assert str(run_dir) in result.stderr  # the error names the checkpoint path it looked for


def test_conf_ships_as_package_data():
    import tomllib

    from qat_lightning.app.conf_dir import config_dir

    assert config_dir() == (ROOT / "conf").resolve()  # qat_lightning/conf is the top-level conf/
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "qat_lightning"
    shipped = {p.resolve() for pattern in patterns["qat_lightning"] for p in package.glob(pattern)}
    every = {p.resolve() for p in (ROOT / "conf").rglob("*") if p.is_file()}
    assert every and every == shipped


def test_make_factories_never_overrides_a_callback_key_silently():
    from qat_lightning.cli import ConfigError, compose, make_factories

    factories = make_factories(compose(["stage=qat", "+callbacks.qat.scales=fixed"]))
    assert factories.callback("qat", scales="fixed", float_steps=None).scales == "fixed"  # agreeing: built
    with pytest.raises(ConfigError) as err:
        factories.callback("qat", scales="moving", float_steps=None)
    assert "callbacks.qat.scales='fixed' vs 'moving'" in str(err.value)
