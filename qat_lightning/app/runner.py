"""``run``: the app's entry point; builds the ``Pipeline`` and runs the stage.

Builds the :class:`~qat_lightning.app.pipeline.Pipeline` for a configuration and hands it to the
runner of ``cfg.stage`` (:mod:`qat_lightning.app.stage_runners`). It lives apart from ``pipeline.py``
so that the stage runners can import the ``Pipeline`` without a circle (``pipeline`` <-
``stage_runners`` <- ``runner``).
"""

from __future__ import annotations

from pathlib import Path

from qat_lightning.app import stage_runners
from qat_lightning.app.export import export_stage
from qat_lightning.app.pipeline import Pipeline
from qat_lightning.app.schema import AppConfig, StageName
from qat_lightning.app.session import Factories, Session
from qat_lightning.app.summary import Summary
from qat_lightning.app.troubleshoot import troubleshoot_stage

__all__ = ["run"]


def run(cfg: AppConfig, run_dir: Path, factories: Factories, conf_dir: Path) -> Summary:
    """Run ``cfg.stage`` in ``run_dir``; returns the summary (also written to ``summary.md``).

    Args:
        cfg: the configuration.
        run_dir: the Hydra run dir.
        factories: how to build the model, datamodule and logger.
        conf_dir: the config tree.

    Raises:
        ConfigError: from :func:`~qat_lightning.app.preflight.preflight`, before anything trains.
    """
    from qat_lightning.app.preflight import preflight

    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    pipe = Pipeline(Session(cfg, Path(run_dir), factories), Path(conf_dir))
    preflight(pipe)
    runner = {
        StageName.float: stage_runners.float_stage,
        StageName.calibration: stage_runners.calibration_stage,
        StageName.qat: stage_runners.qat_stage,
        StageName.analysis: stage_runners.analysis_stage,
        StageName.pipeline: stage_runners.pipeline_stage,
        StageName.troubleshoot: troubleshoot_stage,
        StageName.export: export_stage,
    }[cfg.stage.name]
    return runner(pipe)
