"""A second fit applies its own ``scales`` mode: learned nodes of an earlier fit move again; pinned ones
(by hand or an earlier fit) stay pinned, named in a warning and counted."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qat_lightning as ql
from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining
from qat_lightning.quant.qat import activation_nodes, io_quant_nodes

pytestmark = pytest.mark.filterwarnings("ignore:Calibration uses only")


def _logged(log_dir) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _fit(tmp_path, lit, data, scales: str, version: int, setter=None):
    callbacks = [
        PrepareQuantization(qconfig_setter=setter),
        Calibration(num_batches=4),
        QuantizationAwareTraining(scales=scales),
    ]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=4, limit_val_batches=1, version=version)
    trainer.fit(lit, datamodule=data)
    return trainer


def _activation_scales(model) -> dict[str, torch.Tensor]:
    return {name: node.scale.detach().clone() for name, node in activation_nodes(model)}


def test_a_moving_fit_releases_the_scales_an_earlier_fit_learned(tmp_path, lit, data) -> None:
    _fit(tmp_path, lit, data, "learned", version=0)
    before = _activation_scales(lit.model)
    trainer = _fit(tmp_path, lit, data, "moving", version=1)
    modes = {name: node.scale_mode for name, node in activation_nodes(lit.model)}
    assert set(modes.values()) == {"moving"}, modes
    assert not [n for n, _ in lit.model.named_parameters() if n.endswith("scale_param")]
    after = _activation_scales(lit.model)
    assert all(not torch.equal(after[name], scale) for name, scale in before.items()), (before, after)
    logged = _logged(trainer.logger.log_dir)
    assert logged["qat/fixed_scales"] == [0.0]  # the real count after applying the mode
    assert "qat/learned_scales" not in logged


@pytest.mark.parametrize("first", ["fixed", "hand"])
def test_pins_of_an_earlier_fit_or_by_hand_stay_and_are_named_and_counted(tmp_path, lit, data, first) -> None:
    """The callback cannot tell a hand pin (the documented way to pin chosen nodes) from an earlier fit's:
    releasing would silently undo a hand pin, so they stay, a warning names them and the count has them."""
    if first == "fixed":
        _fit(tmp_path, lit, data, "fixed", version=0)
        pinned = {name for name, _ in activation_nodes(lit.model)}
    else:
        _fit(tmp_path, lit, data, "moving", version=0)
        name, node = activation_nodes(lit.model)[1]
        ql.set_qat_scales(lit.model, "fixed", [node])
        pinned = {name}
    before = _activation_scales(lit.model)
    with pytest.warns(UserWarning, match=r"(?s)stay pinned.*" + sorted(pinned)[0].replace(".", r"\.")):
        trainer = _fit(tmp_path, lit, data, "moving", version=1)
    after = _activation_scales(lit.model)
    assert {name for name, node in activation_nodes(lit.model) if node.is_fixed} == pinned
    assert all(torch.equal(after[name], before[name]) for name in pinned)
    assert all(not torch.equal(after[n], before[n]) for n in before if n not in pinned)
    assert _logged(trainer.logger.log_dir)["qat/fixed_scales"] == [float(len(pinned))]


def test_a_moving_fit_starts_from_the_learned_scales(tmp_path, lit, data) -> None:
    """learned -> moving: the first moving batch starts from the trained scale, not a recalibrated one."""
    _fit(tmp_path, lit, data, "learned", version=0)
    learned = {name: node.scale_param.detach().abs().clone() for name, node in activation_nodes(lit.model)}
    qat = QuantizationAwareTraining()
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(4), qat], max_epochs=0, version=1)
    trainer.fit(lit, datamodule=data)  # setup only: no step moves the scales
    for name, node in activation_nodes(lit.model):
        assert node.scale_mode == "moving" and torch.equal(node.scale, learned[name]), name


def test_fixed_input_output_after_learned_pins_only_the_io_nodes(tmp_path, lit, data) -> None:
    _fit(tmp_path, lit, data, "learned", version=0)
    trainer = _fit(tmp_path, lit, data, "fixed_input_output", version=1)
    io = {name for name, _ in io_quant_nodes(lit.model)}
    pinned = {name for name, node in activation_nodes(lit.model) if node.is_fixed}
    assert pinned == io and len(io) < len(activation_nodes(lit.model))
    assert _logged(trainer.logger.log_dir)["qat/fixed_scales"] == [float(len(io))]


def test_nodes_pinned_by_their_qconfig_stay_pinned_and_are_counted(tmp_path, lit, data) -> None:
    setter = ql.QconfigSetter(templates=[ql.ModuleNameTemplate({"fc2": {"threshold": 8.0}})])
    _fit(tmp_path, lit, data, "learned", version=0, setter=setter)
    trainer = _fit(tmp_path, lit, data, "moving", version=1, setter=setter)
    pinned = {name for name, node in activation_nodes(lit.model) if node.is_fixed}
    assert pinned == {"fc2.output_quant"}  # a fixed-threshold observer stays fixed whatever the mode
    assert lit.model.get_submodule("fc2.output_quant").scale == pytest.approx(8.0 / 127)
    assert _logged(trainer.logger.log_dir)["qat/fixed_scales"] == [1.0]


def test_validate_loads_a_checkpoint_of_another_scale_mode(tmp_path, lit, data) -> None:
    """Evaluating trains nothing: only a fit refuses a checkpoint of other QAT settings."""
    from cb_helpers import LitClassifier, make_loader

    trainer = _fit(tmp_path, lit, data, "learned", version=0)
    path = tmp_path / "learned.ckpt"
    trainer.save_checkpoint(path)
    x = make_loader(64, 3).dataset.tensors[0]
    with torch.no_grad():
        expected = lit.model.eval()(x)
    fresh = LitClassifier(net="fresh")
    callbacks = [PrepareQuantization(), Calibration(4), QuantizationAwareTraining()]  # default: moving
    make_trainer(tmp_path, callbacks, limit_val_batches=1, version=1).validate(
        fresh, datamodule=data, ckpt_path=path, verbose=False
    )
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(x), expected)
    with pytest.raises(ValueError, match="scales='learned'.*this run uses scales='moving'"):
        make_trainer(tmp_path, callbacks, limit_train_batches=1, version=2).fit(
            LitClassifier(net="fresh"), datamodule=data, ckpt_path=path
        )
