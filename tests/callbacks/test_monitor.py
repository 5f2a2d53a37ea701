"""QuantStatsMonitor: ``every_n_validations`` counts the fit's validation passes, also across a resume."""

from __future__ import annotations

import pytest
from cb_helpers import LitClassifier, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qat_lightning.callbacks import (
    Calibration,
    PrepareQuantization,
    QuantizationAwareTraining,
    QuantStatsMonitor,
)

STEPS_PER_EPOCH = 2


def _logged_epochs(log_dir) -> list[int]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step // STEPS_PER_EPOCH - 1 for e in acc.Scalars("quant/saturation_max")]


def _fit(tmp_path, data, ckpt_path=None) -> QuantStatsMonitor:
    monitor = QuantStatsMonitor(every_n_validations=3)
    callbacks = [PrepareQuantization(), Calibration(num_batches=2), QuantizationAwareTraining(), monitor]
    if ckpt_path is None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}"))
    trainer = make_trainer(
        tmp_path, callbacks, max_epochs=7, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=1,
        enable_checkpointing=ckpt_path is None, version=int(ckpt_path is not None),
    )  # fmt: skip
    trainer.fit(LitClassifier(), datamodule=data, ckpt_path=ckpt_path)
    return monitor


@pytest.mark.parametrize("resume_after", [0, 1])
def test_every_n_validations_logs_the_same_passes_after_a_resume(tmp_path, data, resume_after):
    _fit(tmp_path, data)
    assert _logged_epochs(tmp_path / "run" / "version_0") == [0, 3, 6]
    monitor = _fit(tmp_path, data, ckpt_path=tmp_path / "ckpt" / f"epoch={resume_after}.ckpt")
    assert _logged_epochs(tmp_path / "run" / "version_1") == [3, 6]
    assert monitor.state_dict() == {"passes": 7}


def test_trainer_validate_logs_without_moving_the_fits_count(tmp_path, data):
    monitor = QuantStatsMonitor(every_n_validations=2)
    callbacks = [PrepareQuantization(), Calibration(num_batches=2), QuantizationAwareTraining(), monitor]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    lit = LitClassifier()
    trainer.validate(lit, datamodule=data, verbose=False)
    assert monitor.saturation and monitor.state_dict() == {"passes": 0}
    monitor.saturation = {}
    trainer.fit(lit, datamodule=data)
    assert monitor.saturation and monitor.state_dict() == {"passes": 1}  # the fit's first pass logs


def test_every_n_validations_is_validated():
    with pytest.raises(ValueError, match="every_n_validations must be an int >= 1"):
        QuantStatsMonitor(every_n_validations=0)


# ------------------------------------------------------------------------------------------- node patterns
def _fit_monitor(tmp_path, data, monitor: QuantStatsMonitor, validate: bool = False) -> None:
    callbacks = [PrepareQuantization(), Calibration(num_batches=2), monitor]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    if validate:
        trainer.validate(LitClassifier(), datamodule=data, verbose=False)
    else:
        trainer.fit(LitClassifier(), datamodule=data)


def test_nodes_given_as_one_string_is_one_pattern(tmp_path, data):
    monitor = QuantStatsMonitor(nodes="fc1.output_quant")
    assert monitor.nodes == ["fc1.output_quant"]
    _fit_monitor(tmp_path, data, monitor)
    assert sorted(monitor.saturation) == ["fc1.output_quant"]


def test_a_pattern_matching_no_node_warns_with_the_node_names(tmp_path, data):
    monitor = QuantStatsMonitor(nodes=["fc1.output_quant", "fc2.outptu_quant"])
    with pytest.warns(
        UserWarning, match=r"\['fc2\.outptu_quant'\] match no integer quant node.*fc1\.output_quant"
    ):
        _fit_monitor(tmp_path, data, monitor)
    assert sorted(monitor.saturation) == ["fc1.output_quant"]


@pytest.mark.parametrize("validate", [False, True], ids=["fit", "validate"])
def test_patterns_matching_no_node_at_all_are_refused(tmp_path, data, validate):
    monitor = QuantStatsMonitor(nodes=["fc1.outptu_quant"])
    with pytest.raises(
        ValueError, match=r"match no integer quant node.*would watch nothing.*fc1\.output_quant"
    ):
        _fit_monitor(tmp_path, data, monitor, validate=validate)


def test_matches_of_non_integer_nodes_only_count_as_unmatched(tmp_path, data):
    monitor = QuantStatsMonitor(nodes=["fc1.input_quant"])  # a float32 (pass-through) node: never watched
    with pytest.raises(ValueError, match="watches int8 / int16 nodes only"):
        _fit_monitor(tmp_path, data, monitor)


@pytest.mark.parametrize(
    ("nodes", "error"), [([], ValueError), ([1], TypeError), (5, TypeError), (["fc1", None], TypeError)]
)
def test_nodes_are_checked_at_construction(nodes, error):
    with pytest.raises(error, match="QuantStatsMonitor: nodes must be"):
        QuantStatsMonitor(nodes=nodes)
