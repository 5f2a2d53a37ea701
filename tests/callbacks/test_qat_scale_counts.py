"""QuantizationAwareTraining logs each scale mode's count under the mode's own TensorBoard name."""

from __future__ import annotations

import pytest
from cb_helpers import make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qat_lightning as ql
from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining
from qat_lightning.quant.qat import activation_nodes


def _scalars(log_dir) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.filterwarnings("ignore:Calibration uses only")
@pytest.mark.parametrize(
    ("scales", "tag", "counted"),
    [
        ("learned", "qat/learned_scales", lambda n: n.scale_mode == "learned"),
        ("fixed", "qat/fixed_scales", lambda n: n.is_fixed),
        ("fixed_input_output", "qat/fixed_scales", lambda n: n.is_fixed),
    ],
)
def test_scale_count_is_logged_under_the_modes_name(tmp_path, lit, data, scales, tag, counted) -> None:
    callbacks = [PrepareQuantization(), Calibration(num_batches=2), QuantizationAwareTraining(scales=scales)]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(lit, datamodule=data)
    expected = sum(1 for _, n in activation_nodes(lit.model) if counted(n))
    assert expected > 0
    logged = _scalars(trainer.logger.log_dir)
    assert logged[tag] == [float(expected)]  # the model's own count, read back from TensorBoard
    other = {"qat/fixed_scales", "qat/learned_scales"} - {tag}
    assert not other & set(logged), logged  # learned scales were logged as qat/fixed_scales
    if scales == "learned":
        assert not any(n.is_fixed for _, n in ql.iter_fake_quantize(lit.model))
