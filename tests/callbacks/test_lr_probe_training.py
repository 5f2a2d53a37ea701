"""QatLrProbe's candidate steps train as the run's own steps do: BN mode, clipping, accumulation, AMP."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import LitClassifier, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from qat_lightning.callbacks import Calibration, PrepareQuantization, QatLrProbe, QuantizationAwareTraining

pytestmark = pytest.mark.filterwarnings("ignore:Calibration uses only")


def _bns(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Recording(LitClassifier):
    """Records BN's training flag and the batch count of every ``training_step`` call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, bool]] = []
        self.phase = "probe"

    def training_step(self, batch, batch_idx):
        self.calls.append((self.phase, all(bn.training for bn in _bns(self.model))))
        return super().training_step(batch, batch_idx)


class _Weights(Callback):
    """Weights at train start (before the probe) and the update of the run's first optimizer step."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.first_update: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = _weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.phase = "run"
        if batch_idx == 0:
            self.before = _weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1 and self.first_update is None:
            self.first_update = _delta(pl_module, self.before)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def _delta(module: nn.Module, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() - start[n] for n, p in module.named_parameters()}


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((d**2).sum() for d in delta.values())))


def _one_step_probe(tmp_path, data, lit=None, before=(), **trainer_kwargs):
    """Probe one step at lr 0.1 scored by its own update; return the probe's and the run's first update."""
    lit = lit or _Recording(lr=0.1)
    weights, seen = _Weights(), {}

    def update_of_the_probe(module) -> float:
        seen["update"] = _delta(module, weights.start)
        return 0.0

    probe = QatLrProbe(lrs=(0.1,), steps=1, eval_fn=update_of_the_probe)
    callbacks = [PrepareQuantization(), Calibration(4), QuantizationAwareTraining(), *before, weights, probe]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=4, limit_val_batches=1, **trainer_kwargs)
    trainer.fit(lit, datamodule=data)
    return lit, trainer, seen["update"], weights.first_update


def test_frozen_batchnorm_stays_frozen_during_the_probe(tmp_path, data) -> None:
    lit, stats = _Recording(), {}

    def bn_state(module) -> float:  # scored after each candidate's steps, before the model is restored
        stats.setdefault("after", []).append([bn.running_mean.clone() for bn in _bns(module.model)])
        stats.setdefault("training", []).append([bn.training for bn in _bns(module.model)])
        return 0.0

    class _Start(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            stats["start"] = [bn.running_mean.clone() for bn in _bns(pl_module.model)]

    qat = QuantizationAwareTraining(bn_mode="freeze_bn")
    probe = QatLrProbe(lrs=(0.1, 1e-3), steps=3, eval_fn=bn_state)
    callbacks = [PrepareQuantization(), Calibration(num_batches=4), qat, _Start(), probe, _Weights()]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(lit, datamodule=data)
    assert _bns(lit.model), "the prepared model has no BatchNorm"
    probe_calls = [frozen for phase, frozen in lit.calls if phase == "probe"]
    assert len(probe_calls) == 2 * 3 and not any(probe_calls)  # BN in eval mode in every probe step
    assert not any(frozen for phase, frozen in lit.calls if phase == "run")  # as in the run
    assert not any(flag for flags in stats["training"] for flag in flags)
    for after in stats["after"]:  # frozen running statistics
        assert all(torch.equal(a, s) for a, s in zip(after, stats["start"], strict=True))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_the_probes_step_as_in_the_run(tmp_path, data, algorithm) -> None:
    clip = 1e-4
    _, _, probe_update, run_update = _one_step_probe(
        tmp_path, data, gradient_clip_val=clip, gradient_clip_algorithm=algorithm
    )
    # measured as w_after - w_before in float32: a 1e-5 step on weights of ~1 is known to ~1e-3 relative
    if algorithm == "norm":
        assert _norm(probe_update) == pytest.approx(0.1 * clip, rel=1e-2)
    else:
        assert max(float(d.abs().max()) for d in probe_update.values()) <= 0.1 * clip * 1.01
    for name, delta in run_update.items():  # the probe's first step is the run's first step
        assert torch.allclose(probe_update[name], delta, rtol=1e-4, atol=1e-9), name


def test_accumulation_takes_as_many_micro_batches_per_probe_step_as_the_run(tmp_path, data) -> None:
    lit, _, probe_update, run_update = _one_step_probe(tmp_path, data, accumulate_grad_batches=2)
    assert sum(1 for phase, _ in lit.calls if phase == "probe") == 2  # one step = two micro-batches
    for name, delta in run_update.items():
        assert torch.allclose(probe_update[name], delta, rtol=1e-4, atol=1e-9), name


def test_16_mixed_probe_steps_use_the_grad_scaler_and_leave_it_as_it_was(tmp_path, data) -> None:
    scaler_states, scaled = [], []
    scaler = torch.amp.GradScaler("cpu")
    scale = scaler.scale
    scaler.scale = lambda loss: scaled.append(len(scaler_states)) or scale(loss)  # counts per phase

    class _Scaler(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            scaler_states.append(trainer.precision_plugin.scaler.state_dict())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 0:
                scaler_states.append(trainer.precision_plugin.scaler.state_dict())

    amp = MixedPrecision("16-mixed", "cpu", scaler=scaler)  # on CPU: fp16 autocast only with a plugin
    _, _, probe_update, run_update = _one_step_probe(tmp_path, data, before=[_Scaler()], plugins=[amp])
    assert scaled.count(1) == 1  # the probe's step scaled its loss, as the run's steps do
    assert scaler_states[0] == scaler_states[1]  # and left the scaler as the run found it
    assert 0 < _norm(probe_update) < 1.0  # unscaled before the step (x65536 would blow the weights away)
    assert _norm(probe_update) == pytest.approx(_norm(run_update), rel=1e-3)


def test_the_probe_refuses_manual_optimization(tmp_path, data) -> None:
    lit = LitClassifier()
    lit.automatic_optimization = False
    probe = QatLrProbe(lrs=(0.1,), steps=1)
    callbacks = [PrepareQuantization(), Calibration(num_batches=4), QuantizationAwareTraining(), probe]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer.fit(lit, datamodule=data)


def test_a_probe_listed_before_qat_warns(tmp_path, data) -> None:
    probe = QatLrProbe(lrs=(0.1,), steps=1, eval_fn=lambda module: 0.0)
    callbacks = [PrepareQuantization(), Calibration(num_batches=4), probe, QuantizationAwareTraining()]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=1, limit_val_batches=1)
    with pytest.warns(UserWarning, match="QatLrProbe is listed before QuantizationAwareTraining"):
        trainer.fit(LitClassifier(), datamodule=data)
