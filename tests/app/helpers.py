"""Helper for the app tests: compose with overrides and run in a directory, with fast settings."""

from __future__ import annotations

from pathlib import Path

from qat_lightning.cli import compose, run_config

FAST = [
    "progress=false",
    "torch_threads=1",
    "train.max_epochs=3",
    "qat.max_epochs=1",
    "calibration.num_batches=4",
    "+data.batch_size=128",
    "sanity.steps=2",
    "sanity.tolerance=0.05",
]


def run_app(run_dir: Path, *overrides: str):
    """Compose ``FAST + overrides`` and run it in ``run_dir``; returns the summary."""
    return run_config(compose([*FAST, *overrides]), Path(run_dir))


def calibration_checkpoint(run_dir: Path, float_overrides: tuple[str, ...], *overrides: str) -> Path:
    """Train the float model and calibrate it (``recipe=int8``) under ``run_dir``; return the checkpoint.

    Args:
        run_dir: the runs go to ``run_dir/float`` and ``run_dir/calib``.
        float_overrides: extra overrides of the float run.
        overrides: extra overrides of both runs.
    """
    run_app(run_dir / "float", "stage=float", *float_overrides, *overrides)
    float_ckpt = run_dir / "float" / "checkpoints" / "float.ckpt"
    run_app(run_dir / "calib", "stage=calibration", "recipe=int8", *overrides, f"ckpt={float_ckpt}")
    return run_dir / "calib" / "checkpoints" / "calibration.ckpt"
