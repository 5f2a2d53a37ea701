"""Quant state (scales, observer statistics, histograms) keeps its dtype under model dtype casts.

``model.bfloat16()`` / ``.half()`` / ``.double()`` and a real ``Trainer(precision="bf16-true")`` QAT fit:
every floating buffer of a quant node stays float32 (float64 for histograms) and still follows device
moves; the fake quant of bf16 activations equals the float64 re-computation cast to bf16; checkpoints
reload.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cb_helpers import make_trainer

import qat_lightning as ql
from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining


def _state_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """dtype of every floating buffer / parameter inside a quant node (all submodules of it)."""
    out = {}
    for name, node in ql.iter_fake_quantize(model):
        for key, t in [*node.named_buffers(), *node.named_parameters()]:
            if t.is_floating_point():
                out[f"{name}.{key}"] = t.dtype
    return out


def _expected(key: str) -> torch.dtype:
    return torch.float64 if ".histogram." in key else torch.float32


def _calibrated_net(observer: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(64, 8) * 2
    model = ql.prepare(net, (x,), ql.get_qconfig(observer=observer, weight_observer=observer))
    ql.set_fake_quantize(model, "calibration")
    with torch.no_grad():
        model(x)
    ql.set_fake_quantize(model, "validation")
    return model, x


@pytest.mark.parametrize("observer", ["minmax", "moving_minmax", "kl", "percentile"])
@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_dtype_casts_keep_quant_state(observer: str, cast: str) -> None:
    model, x = _calibrated_net(observer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = _state_dtypes(model)
    assert dtypes and all(d == _expected(k) for k, d in dtypes.items())
    getattr(model, cast)()
    assert _state_dtypes(model) == dtypes
    for key, value in model.state_dict().items():  # the quant state is untouched, bit for bit
        if any(key.startswith(n + ".") for n, _ in ql.iter_fake_quantize(model)):
            assert torch.equal(value, before[key]), key
    assert next(model.parameters()).dtype == getattr(torch, "float64" if cast == "double" else cast)
    meta = copy.deepcopy(model).to("meta")  # device moves still apply
    assert all(t.is_meta for t in meta.buffers())
    assert _state_dtypes(meta) == dtypes


def test_bf16_fake_quant_equals_float64_reference() -> None:
    model, x = _calibrated_net("kl")
    model.bfloat16()
    node = next(n for _, n in ql.iter_fake_quantize(model) if n.ch_axis is None and n.dtype.is_integer)
    xb = (x * 1.3).bfloat16()
    out = node(xb)
    scale = node.scale.double()
    ref = (torch.clamp(torch.round(xb.double() / scale), node.dtype.qmin, node.dtype.qmax) * scale).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_bf16_true_trainer_qat_keeps_state_and_reloads(tmp_path, lit, data) -> None:
    callbacks = [
        PrepareQuantization(qconfig_setter=ql.get_qconfig(observer="kl")),
        Calibration(num_batches=4),
        QuantizationAwareTraining(),
    ]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1, precision="bf16-true")
    trainer.fit(lit, datamodule=data)
    dtypes = _state_dtypes(lit.model)
    assert any(".histogram." in k for k in dtypes)
    assert all(d == _expected(k) for k, d in dtypes.items()), dtypes
    assert next(lit.model.parameters()).dtype == torch.bfloat16
    for _, node in ql.iter_fake_quantize(lit.model):
        if node.dtype.is_integer and node.ch_axis is None:
            assert bool(torch.isfinite(node.scale).all())
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    for name, _node in ql.iter_fake_quantize(lit):
        assert state[f"{name}.scale"].dtype == torch.float32
    reloaded = copy.deepcopy(lit)
    for t in reloaded.state_dict().values():
        if t.is_floating_point():
            t.zero_()
    reloaded.load_state_dict(state)
    assert _state_dtypes(reloaded.model) == dtypes
    for key, value in lit.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_node_built_under_a_half_default_dtype_keeps_a_float32_scale() -> None:
    """Lightning's ``init_module`` sets the default dtype while modules are built (``*-true`` precisions)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        node = ql.FakeQuantize("qint8", observer="kl")
    finally:
        torch.set_default_dtype(previous)
    assert node.scale.dtype == torch.float32
    assert all(b.dtype != torch.bfloat16 for b in node.buffers())
