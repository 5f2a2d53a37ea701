"""Export checks leave the model as found: frozen BatchNorms frozen, switches on, also on errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.export_check import check_export
from qat_lightning.analysis.export_layers import compare_export_per_layer
from qat_lightning.quant.calibrate import calibrate
from qat_lightning.quant.export import export_onnx
from tests.models import TinyResNet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class _Boom(Exception):
    pass


def _failing(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise _Boom("batch failed")
        yield b


@pytest.fixture
def frozen(tmp_path):
    """A QAT model mid-training: train mode, BatchNorms frozen (eval), exported."""
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    model = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0],), qat_mode="with_bn").eval()
    calibrate(model, xs)
    path = export_onnx(model, (xs[0],), tmp_path / "m.onnx").path
    model.train()
    ql.set_fake_quantize(model, "qat")
    ql.freeze_batchnorm(model)
    return model, path, xs


def _analysis(model, path, xs, out_dir):
    qa = QuantAnalysis(model, out_dir=out_dir, reference="onnxruntime", onnx_path=path)
    qa.run(xs[:1])
    return qa.compare_per_layer(plot=False)


TOOLS = {
    "check_export": lambda m, p, xs, d: check_export(m, p, xs, optimization="disabled"),
    "compare_export_per_layer": lambda m, p, xs, d: compare_export_per_layer(
        m, p, xs, optimization="disabled"
    ),
    "quant_analysis": lambda m, p, xs, d: _analysis(m, p, xs, d),
    "check_export(raises)": lambda m, p, xs, d: check_export(m, p, _failing(xs, 1), optimization="disabled"),
    "compare_export_per_layer(raises)": lambda m, p, xs, d: compare_export_per_layer(
        m, p, _failing(xs, 0), optimization="disabled"
    ),
}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_frozen_batchnorms_stay_frozen(frozen, tmp_path, tool):
    model, path, xs = frozen
    flags = {name: m.training for name, m in model.named_modules()}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    assert bns and model.training and not any(m.training for m in bns)
    states = {name: n.state for name, n in ql.iter_fake_quantize(model)}

    try:
        TOOLS[tool](model, path, xs, tmp_path / "qa")
    except _Boom:
        assert tool.endswith("(raises)")

    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: n.state for name, n in ql.iter_fake_quantize(model)} == states
    assert not any(n._forward_hooks for _, n in ql.iter_fake_quantize(model))
    model(xs[1] * 3 + 1)  # one more QAT step: the frozen running statistics must not move
    for m, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


class _Flaky(nn.Module):
    """Turns FakeCast off for ``b`` and raises there for a batch of 3 (before turning it back on)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.a(x)
        ql.FakeCast.disable()
        if x.shape[0] == 3:
            raise _Boom("bad batch")
        x = self.b(x)
        ql.FakeCast.enable()
        return x


def test_switches_are_restored_when_the_forward_raises(tmp_path):
    xs = [torch.randn(4, 8), torch.randn(4, 8)]
    model = ql.prepare(_Flaky().eval(), example_inputs=(xs[0],), method="eager").eval()
    calibrate(model, xs)
    path = export_onnx(model, (xs[0],), tmp_path / "m.onnx").path
    for tool in (check_export, compare_export_per_layer):
        try:
            with pytest.raises(_Boom):
                tool(model, path, [torch.randn(3, 8)], optimization="disabled")
            restored = ql.FakeCast.enabled() and ql.GlobalFakeQuantSwitch.enabled()
        finally:  # never leave a process-wide switch off for the next test
            ql.FakeCast.enable()
            ql.GlobalFakeQuantSwitch.enable()
        assert restored, tool.__name__
