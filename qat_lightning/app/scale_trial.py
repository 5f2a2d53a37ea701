"""QAT with the seed's "fixed vs updated input/output scales" trial (QAT §2, ``qat.scale_trial=true``).

"When the accuracy of calibration model is good, fixing the input/output scale for QAT training can
achieve better results. Otherwise, do not fix the scales. Both of the two strategies need to be tested."
With the trial on and the calibration model meeting the target, QAT runs twice from the same calibration
checkpoint, ``scales=moving`` (updated) and ``scales=fixed_input_output`` (the model's input/output scales
pinned), the better run becomes ``checkpoints/qat.ckpt`` and both rows plus the decision go into the summary.
Otherwise one QAT run with ``qat.scales``. A scale mode the trial cannot honour (``fixed``, ``learned``) is
refused before anything runs (``qat_lightning.app.config_checks``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["run_qat"]

log = logging.getLogger("qat_lightning")


def _single(
    pipe: Any,
    calib: Path,
    recipe: Any,
    float_metric: float | None,
    lr: float | None,
    title: str,
    own_dir: bool,
) -> tuple[Any, float, Path | None, Any]:
    out = pipe.step("qat", title, own_dir)
    lit, metric, ckpt, info = pipe.session.qat(calib, out, lr=lr)
    pipe.result("qat", recipe, metric, float_metric, lit, ckpt, out)
    return lit, metric, ckpt, info


def run_qat(
    pipe: Any,
    calib: Path,
    recipe: Any,
    calib_metric: float | None,
    float_metric: float | None,
    lr: float | None,
    title: str,
    own_dir: bool = True,
) -> tuple[Any, float, Path | None, Any]:
    """Run QAT (with the scale trial when ``qat.scale_trial`` and the calibration is good).

    The trial's two runs are ``scales=moving`` and ``scales=fixed_input_output``
    (:data:`~qat_lightning.app.config_checks.TRIAL_SCALES`), saved as ``checkpoints/qat_scales_<mode>.ckpt``.

    Args:
        pipe: the :class:`~qat_lightning.app.pipeline.Pipeline`.
        calib: the calibration checkpoint.
        recipe: its recipe (for the summary rows).
        calib_metric: the calibration model's metric (``None``: unknown, no trial).
        float_metric: the float model's metric (the target is derived from it).
        lr: the QAT LR (``None``: ``qat.lr``).
        title: the step title.
        own_dir: the step gets its own numbered directory.

    Returns:
        ``(module, metric, checkpoint, calibration info)`` of the kept run.
    """
    from qat_lightning.app.checkpoints import barrier, is_rank_zero
    from qat_lightning.app.config_checks import TRIAL_SCALES, qat_scales

    s, q = pipe.session, pipe.cfg.qat
    if not q.scale_trial:
        return _single(pipe, calib, recipe, float_metric, lr, title, own_dir)
    target = None if float_metric is None else s.target(float_metric)
    if calib_metric is None or target is None or not s.meets(calib_metric, target):
        shown = "-" if calib_metric is None else f"{calib_metric:.4f}"
        goal = "-" if target is None else f"{target:.4f}"
        pipe.decide(
            f"scale trial skipped: calibration {shown} does not meet the target {goal} (the seed tries fixed "
            f"scales only for a calibration that meets it); QAT with qat.scales={qat_scales(pipe.cfg)}"
        )
        return _single(pipe, calib, recipe, float_metric, lr, title, own_dir)
    runs = []
    for scales in TRIAL_SCALES:
        label = f"scales={scales}"
        out = pipe.step(f"qat_{scales}", f"{title}, {label}")
        lit, metric, ckpt, info = s.qat(calib, out, name=f"qat_scales_{scales}", lr=lr, scales=scales)
        pipe.result(f"qat ({label})", recipe, metric, float_metric, lit, ckpt, out)
        runs.append((metric, label, lit, ckpt, info, out))
    (m_moving, *_), (m_fixed, *_) = runs
    fixed_better = m_fixed > m_moving if s.higher_is_better else m_fixed < m_moving
    metric, label, lit, ckpt, info, out = runs[1] if fixed_better else runs[0]
    final = s.ckpt_dir / "qat.ckpt"
    if ckpt is not None:
        if is_rank_zero():
            import shutil

            shutil.copyfile(ckpt, final)
        barrier()
    pipe.result("qat", recipe, metric, float_metric, lit, final, out, f"kept: {label}")
    pipe.decide(
        f"scale trial (calibration {calib_metric:.4f} meets the target {target:.4f}): {runs[0][1]} "
        f"{m_moving:.4f} vs {runs[1][1]} {m_fixed:.4f}; kept {label} as checkpoints/qat.ckpt"
    )
    return lit, metric, final, info
