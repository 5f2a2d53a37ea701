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
