"""QuantizationAwareTraining(scales=...) through a real Trainer; half-precision QAT (bf16-true, 16-true)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cb_helpers import CLASSES, HIDDEN, IN, LitClassifier, make_trainer, scales
from lightning.pytorch import Callback
from torch import nn

import qat_lightning as ql
from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining
from qat_lightning.quant.qat import io_quant_nodes


class _StartValues(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {
            n: p.detach().clone() for n, p in pl_module.named_parameters() if n.endswith("scale_param")
        }
        self.calibrated = {
            name: node.scale.clone()
            for name, node in ql.iter_fake_quantize(pl_module)
            if node.scale_mode == "learned"
        }


def test_learned_scales_train_from_the_calibrated_scales(tmp_path, lit, data) -> None:
    qat, spy = QuantizationAwareTraining(scales="learned"), _StartValues()
    trainer = make_trainer(
        tmp_path, [PrepareQuantization(), Calibration(num_batches=10), qat, spy], max_epochs=1
    )
    trainer.fit(lit, datamodule=data)
    learned = [n for _, n in ql.iter_fake_quantize(lit.model) if n.scale_mode == "learned"]
    assert learned, "no node was put in learned mode"
    group = trainer.optimizers[0].param_groups[-1]["params"]
    assert {id(p) for p in group} == {id(n.scale_param) for n in learned}  # the optimizer trains them
    assert spy.calibrated and all(  # QAT starts from the calibrated scales
        torch.equal(spy.start[f"{name}.scale_param"], scale) for name, scale in spy.calibrated.items()
    )
    moved = [n for n in learned if not torch.equal(n.scale_param.detach(), spy.start[_param_name(lit, n)])]
    assert moved, "no learned scale moved"
    after = scales(lit.model)
    assert all(
        torch.equal(after[name], n.scale_param.detach().abs())
        for name, n in ql.iter_fake_quantize(lit.model)
        if n in learned
    )


def _param_name(lit, node) -> str:
    return next(f"{name}.scale_param" for name, n in ql.iter_fake_quantize(lit) if n is node)


def test_scales_argument_is_validated_and_folds_fix_scales() -> None:
    with pytest.raises(ValueError, match="allowed: moving, fixed_input_output, fixed, learned"):
        QuantizationAwareTraining(scales="frozen")
    assert QuantizationAwareTraining(fix_scales="all").scales == "fixed"
    assert QuantizationAwareTraining(fix_scales="input_output").scales == "fixed_input_output"
    assert QuantizationAwareTraining().scales == "moving"
    with pytest.raises(ValueError, match="contradicts"):
        QuantizationAwareTraining(fix_scales="all", scales="learned")


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "bf16-mixed"])
def test_half_precision_qat_trains(tmp_path, lit, data, precision) -> None:
    callbacks = [PrepareQuantization(), Calibration(num_batches=4), QuantizationAwareTraining()]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, precision=precision)
    trainer.fit(lit, datamodule=data)
    nodes = [n for _, n in ql.iter_fake_quantize(lit.model)]
    assert all(n.scale.dtype == torch.float32 and bool(torch.isfinite(n.scale).all()) for n in nodes)
    assert all(n.state is ql.FakeQuantState.VALIDATION for n in nodes)


def test_bf16_true_probe_analysis_and_ptq_get_converted_batches(tmp_path, lit, data) -> None:
    """Callbacks that feed batches themselves convert them as Lightning does (bf16 inputs, bf16 model)."""
    from qat_lightning.callbacks import AdaRound, BiasCorrection, QatLrProbe, QuantAnalysisCallback

    probe = QatLrProbe(lrs=(1e-4, 1e-2), steps=2, eval_batches=1)
    analysis = QuantAnalysisCallback(num_steps=1, sensitivity=False)
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=2),
        AdaRound(num_batches=1, iterations=2),
        BiasCorrection(num_batches=1),
        QuantizationAwareTraining(),
        probe,
        analysis,
    ]
    trainer = make_trainer(
        tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=2, precision="bf16-true"
    )
    trainer.fit(lit, datamodule=data)  # fed fp32 batches, the bf16 model raised "same dtype" errors
    assert next(lit.parameters()).dtype == torch.bfloat16
    assert probe.result is not None and len(probe.result.rows) == 2
    assert all(torch.isfinite(torch.tensor(r.metric)) for r in probe.result.rows)
    assert analysis.outcome is not None and analysis.outcome.per_layer is not None


class _FunctionalNet(nn.Module):
    """Linear -> F.relu -> Linear -> F.relu -> Linear: eager mode sees the linears only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = (
            nn.Linear(IN, HIDDEN),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Linear(HIDDEN, CLASSES),
        )

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.filterwarnings("ignore:Calibration uses only")
def test_fixed_input_output_pins_only_the_io_nodes_of_an_eager_model(tmp_path, data) -> None:
    lit = LitClassifier(net="fresh")
    lit.model = _FunctionalNet()
    fx_model = ql.prepare(lit.model.eval(), example_inputs=lit.example_input_array, method="fx")
    expected = {name for name, _ in io_quant_nodes(fx_model)}
    assert expected == {"x_quant.output_quant", "head.output_quant"}
    callbacks = [
        PrepareQuantization(method="eager"),
        Calibration(num_batches=2),
        QuantizationAwareTraining(scales="fixed_input_output"),
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(lit, datamodule=data)
    assert lit.model.prepare_record.method == "eager"
    pinned = {name for name, node in ql.iter_fake_quantize(lit.model) if node.is_fixed}
    assert pinned == expected  # not fc1 / fc2, whose outputs feed F.relu
    assert not any(lit.model.get_submodule(f"{op}.output_quant").is_fixed for op in ("fc1", "fc2"))


def test_resuming_another_scale_mode_with_learned_scales_is_refused_by_name(tmp_path, lit, data) -> None:
    """The scales made in setup leave a moving-scale checkpoint loadable: the recipe check names the clash."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [PrepareQuantization(), Calibration(4), QuantizationAwareTraining(), ckpt]
    make_trainer(tmp_path, callbacks, limit_train_batches=2, enable_checkpointing=True).fit(
        lit, datamodule=data
    )
    other = [PrepareQuantization(), Calibration(4), QuantizationAwareTraining(scales="learned")]
    with pytest.raises(ValueError, match="scales='moving'.*this run uses scales='learned'"):
        make_trainer(tmp_path, other, max_epochs=2, version=1).fit(
            LitClassifier(), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )


@pytest.mark.filterwarnings("ignore:Calibration uses only")
def test_learned_scales_of_a_model_prepared_after_setup_are_made_at_train_start(tmp_path, lit, data) -> None:
    callbacks = [
        QuantizationAwareTraining(scales="learned"),
        PrepareQuantization(),
        Calibration(num_batches=2),
    ]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(lit, datamodule=data)
    learned = [n.scale_param for _, n in ql.iter_fake_quantize(lit.model) if n.scale_mode == "learned"]
    assert learned and trainer.optimizers[0].param_groups[-1]["params"] == learned
