"""Empirical bias correction: shift each conv / linear op's bias by its mean quantization error.

For each gemm op in graph order, the mean of its output per output channel over the calibration batches is
measured twice: in float and quantized (the model as calibrated, with the ops before it already corrected
and its own output quant node off, so the op's rounding of its result does not enter its own correction).
The difference is added to the op's bias (to the BN's beta for a folded conv-bn). For an op without a fused
ReLU the mean output error on those batches is then zero; with a fused ReLU the shift is the mean error
after the ReLU, an approximation (the ReLU passes only part of it). No labels.

The float side is the original float model: the prepared model with fake quant off inside
:func:`qat_lightning.ptq.float_reference`, i.e. with the float weights and biases from before any
post-training step (AdaRound's rounded weights and an earlier correction are recorded, not lost). So after
AdaRound the correction covers the error its rounding leaves, and a second call starts again from the
original biases (the same batches give the same model, not a doubled shift). The biases it overwrites are
recorded in turn (:mod:`qat_lightning.ptq.float_record`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.analysis.inputs import InputFn, ModelInputs
from qat_lightning.ptq.capture import calibration_batches, channel_sum, record, run_all
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.ptq.gemm_view import GemmView, calibrated_views
from qat_lightning.quant import FakeQuantState, fake_quant_state, quant_nodes_of

__all__ = ["BiasCorrectionRow", "BiasCorrectionResult", "bias_correction"]


@dataclass(frozen=True)
class BiasCorrectionRow:
    """What bias correction did to one op.

    Attributes:
        name: op name.
        mean_error_before: mean over channels of ``|mean output error|`` before the shift.
        max_shift: largest ``|bias shift|`` over the channels.
    """

    name: str
    mean_error_before: float
    max_shift: float


@dataclass(frozen=True)
class BiasCorrectionResult:
    """Per-op rows, and the weighted ops left as they were with the reason."""

    rows: tuple[BiasCorrectionRow, ...]
    skipped: tuple[tuple[str, str], ...]


def _channel_means(model: nn.Module, view: GemmView, batches: list[ModelInputs]) -> Tensor:
    with record(view.op, lambda _a, out: channel_sum(out, view.channel_dim)) as sums:
        run_all(model, batches)
    if not sums:
        raise ValueError(f"bias_correction: op {view.name!r} never ran on the calibration batches")
    return torch.stack([s for s, _ in sums]).sum(0) / sum(n for _, n in sums)


def bias_correction(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
) -> BiasCorrectionResult:
    """Correct the bias of every conv / linear op of a calibrated model for its mean quantization error.

    The reference is the original float model (module docstring): a bias corrected by an earlier call is
    written back to its float value first, so calling it again with the same batches changes nothing.

    Args:
        model: a prepared, calibrated model (quant nodes in VALIDATION state, or FLOAT where kept float).
        dataloader: calibration batches (no labels needed).
        num_batches: how many batches to use (``None``: all).
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).

    Returns:
        What was corrected, op by op, and what was skipped (and why: e.g. an op without a bias, for a bias
        is not added, so checkpoints keep loading into a freshly prepared model; an op kept in float, all
        its quant nodes FLOAT, whose bias stays the float one).

    Raises:
        ValueError: for an uncalibrated model, a model in CALIBRATION state, bad ``num_batches`` or no batch.
    """
    views, skipped = calibrated_views(model, "bias_correction")
    skipped += tuple(
        (v.name, "no bias (adding one would change the state_dict keys)") for v in views if not v.has_bias
    )
    views = [v for v in views if v.has_bias]
    batches = calibration_batches(dataloader, num_batches, input_fn, "bias_correction")
    for view in views:
        view.restore_bias()  # an earlier correction: start again from the float bias
    kept_float = {
        id(v) for v in views if all(n.state is FakeQuantState.FLOAT for n in quant_nodes_of(v.op).values())
    }
    skipped += tuple((v.name, "quant nodes all FLOAT (kept float)") for v in views if id(v) in kept_float)
    views = [v for v in views if id(v) not in kept_float]
    with float_reference(model), fake_quant_state(model, FakeQuantState.FLOAT):
        reference = {v.name: _channel_means(model, v, batches) for v in views}
    rows = []
    for view in views:
        with fake_quant_state(view.output_quant, FakeQuantState.FLOAT):
            error = reference[view.name] - _channel_means(model, view, batches)
        view.shift_bias(error)
        rows.append(BiasCorrectionRow(view.name, float(error.abs().mean()), float(error.abs().max())))
    return BiasCorrectionResult(tuple(rows), skipped)
