"""Eager-mode fusion through the user's fuse hook (fuse_fn / fuse_model), checked against fx's fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.quantization import fuse_modules as ao_fuse_modules

from qat_lightning.quant import (
    EagerFused,
    check_model,
    fuse_modules,
    iter_quant_ops,
    prepare,
    set_fake_quantize,
)
from qat_lightning.quant.nodes.qat_modules import QatConvBn, QatGemm

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """conv-bn-relu, then conv-bn + residual add + relu (a ResNet basic block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU()
        self.fused_add = False
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def fuse_model(self) -> None:
        fuse_modules(self, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "add", "relu2"]])
        self.fused_add = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        if self.fused_add:
            return self.conv2(out, x)
        return self.relu2(self.bn2(self.conv2(out)) + x)


class PlainBlock(Block):
    fuse_model = None  # no hook: the unfused model


def _calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    set_fake_quantize(model, "calibration")
    with torch.no_grad():
        for b in batches:
            model(b)
    set_fake_quantize(model, "validation")


def test_fuse_model_hook_fuses_conv_bn_relu_and_conv_bn_add_relu_in_eager(tmp_path, seed):
    model = Block().eval()
    x = torch.randn(2, 4, 6, 6)
    prepared = prepare(model, x, method="eager", check_dir=tmp_path)
    assert not model.fused_add and isinstance(model.conv1, nn.Conv2d)  # the user's model is untouched
    ops = dict(iter_quant_ops(prepared))
    assert list(ops) == ["x_quant", "conv1", "conv2"]
    assert isinstance(ops["conv1"], QatConvBn) and ops["conv1"].relu and not ops["conv1"].add
    assert isinstance(ops["conv2"], QatConvBn) and ops["conv2"].relu and ops["conv2"].add
    assert [i.op_info.op_type for i in ops.values()] == ["quant", "ConvBnReLU2d", "ConvBnAddReLU2d"]
    assert ops["conv2"].op_info.input_producers == ("conv1", "x_quant")
    report = check_model(prepared)
    assert report.fusable == () and report.float_ops == ()
    assert "Fusable modules are listed below:\nNone" in (tmp_path / "model_check_result.txt").read_text()
    with torch.no_grad():
        set_fake_quantize(prepared, "float")
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)


def test_eager_fused_model_quantizes_like_fx(seed):
    batches = [torch.randn(4, 4, 6, 6) for _ in range(3)]
    block = Block().eval()
    plain = PlainBlock().eval()
    plain.load_state_dict(block.state_dict())
    eager = prepare(block, batches[0], method="eager")
    fx = prepare(plain, batches[0], method="fx")
    assert [i.op_info.op_type for _, i in iter_quant_ops(fx)] == ["quant", "ConvBnReLU2d", "ConvBnAddReLU2d"]
    for m in (eager, fx):
        _calibrate(m, batches)
    with torch.no_grad():
        torch.testing.assert_close(eager(batches[1]), fx(batches[1]), rtol=1e-5, atol=1e-5)


def test_without_hook_eager_reports_the_unfused_chains():
    prepared = prepare(PlainBlock().eval(), torch.randn(2, 4, 6, 6), method="eager", qconfig_setter=None)
    chains = prepared.prepare_record.unfused
    assert ("conv1", "bn1", "relu1") in chains
    assert any("fuse_fn / fuse_model()" in n for n in prepared.prepare_record.notes)


def test_fuse_fn_with_torch_ao_fuse_modules():
    model = PlainBlock().eval()
    x = torch.randn(2, 4, 6, 6)

    def fuse(m: nn.Module) -> nn.Module:
        return ao_fuse_modules(m, [["conv1", "bn1", "relu1"]])  # eval: BN folded into the conv

    prepared = prepare(model, x, method="eager", fuse_fn=fuse)
    ops = dict(iter_quant_ops(prepared))
    assert isinstance(ops["conv1"], QatGemm) and ops["conv1"].relu
    assert ops["conv1"].op_info.op_type == "ConvReLU2d"
    with torch.no_grad():
        set_fake_quantize(prepared, "float")
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([["bn1", "relu1"]], "must be a Conv1d/2d/3d or Linear"),
        ([["conv1", "add", "relu1"]], "after a BatchNorm only"),
        ([["conv1", "bn1", "relu1"], ["conv1", "bn2"]], "more than one group"),
        ([["conv1", "relu1", "bn1"]], "allowed forms"),
    ],
)
def test_bad_fuse_groups_are_refused(groups, match):
    with pytest.raises(ValueError, match=match):
        fuse_modules(PlainBlock(), groups)


def test_fuse_fn_must_be_callable_and_return_a_module_or_none():
    with pytest.raises(TypeError, match="fuse_fn must be a callable"):
        prepare(PlainBlock().eval(), torch.randn(1, 4, 6, 6), fuse_fn="conv1")
    with pytest.raises(TypeError, match="must return None or the fused"):
        prepare(PlainBlock().eval(), torch.randn(1, 4, 6, 6), fuse_fn=lambda m: 3)


def test_fused_add_module_needs_the_residual():
    fused = EagerFused(nn.Linear(2, 2), nn.BatchNorm1d(2), add=True)
    with pytest.raises(TypeError, match="fused\\(x, residual\\)"):
        fused(torch.randn(3, 2))


def test_fx_does_not_call_fuse_model_but_fuses_by_itself():
    prepared = prepare(Block().eval(), torch.randn(2, 4, 6, 6), method="fx")
    assert not any(isinstance(m, EagerFused) for m in prepared.modules())
    types = [op.op_info.op_type for _, op in iter_quant_ops(prepared)]
    assert types == ["quant", "ConvBnReLU2d", "ConvBnAddReLU2d"]


def test_explicit_fuse_fn_runs_on_the_fx_path_too():
    calls = []

    def fuse(m: nn.Module) -> None:
        calls.append(type(m).__name__)
        m.fuse_model()

    prepared = prepare(Block().eval(), torch.randn(2, 4, 6, 6), method="fx", fuse_fn=fuse)
    assert calls == ["Block"]
    assert any(isinstance(m, QatConvBn) and m.add for m in prepared.modules())
