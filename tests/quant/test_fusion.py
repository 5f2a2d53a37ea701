"""Fusion in fx mode: patterns, unfused reasons, and BN-mode numerics (float64) against the float model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat_lightning.quant.dtypes import float32
from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize, set_fake_quantize
from qat_lightning.quant.nodes.frozen import frozen_parameters
from qat_lightning.quant.nodes.qat_modules import QatConvBn, QatGemm
from qat_lightning.quant.ops import iter_quant_ops
from qat_lightning.quant.preparation.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add barrier waits


class ConvBnReLU(nn.Module):
    def __init__(self, bias: bool = True, residual: bool = False, dims: int = 2) -> None:
        super().__init__()
        conv, bn = {
            1: (nn.Conv1d, nn.BatchNorm1d),
            2: (nn.Conv2d, nn.BatchNorm2d),
            3: (nn.Conv3d, nn.BatchNorm3d),
        }[dims]
        self.residual = residual
        self.conv = conv(3, 4, 3, padding=1, bias=bias)
        self.bn = bn(4)
        self.relu = nn.ReLU()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.residual:
            y = y + torch.cat([x, x[:, :1]], 1)
        return self.relu(y)

    def example(self, batch: int = 4) -> torch.Tensor:
        return torch.randn(batch, 3, *([6] * self.dims))


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)


def _identity_quant(prepared: nn.Module) -> None:
    """QAT state but every node float32: the fold path runs, values are untouched."""
    set_fake_quantize(prepared, "qat")
    for _, node in iter_fake_quantize(prepared):
        node.dtype = float32


def _fused_op(prepared: nn.Module) -> QatConvBn:
    ops = [op for _, op in iter_quant_ops(prepared) if isinstance(op, QatConvBn)]
    assert len(ops) == 1
    return ops[0]


@pytest.mark.parametrize("qat_mode", ["fuse_bn", "with_bn", "freeze_bn"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_matches_unfused_float64(qat_mode, training, residual, seed):
    model = ConvBnReLU(residual=residual).double()
    _randomize_bn(model.bn)
    x = model.example().double()
    prepared = prepare(model, x, method="fx", qat_mode=qat_mode)
    op = _fused_op(prepared)
    assert op.op_info.op_type == ("ConvBnAddReLU2d" if residual else "ConvBnReLU2d")
    assert op.qat_mode == qat_mode
    _identity_quant(prepared)
    ref = copy.deepcopy(model)
    ref.train(training)
    prepared.train(training)
    if qat_mode == "freeze_bn":
        ref.bn.eval()  # frozen statistics
        assert not op.bn.training
    x.requires_grad_(True)
    out = prepared(x)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = ref(x_ref)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.bn.running_mean, ref.bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.bn.running_var, ref.bn.running_var, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(op.conv.weight.grad, ref.conv.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(op.bn.weight.grad, ref.bn.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(op.bn.bias.grad, ref.bn.bias.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("qat_mode", ["fuse_bn", "with_bn", "freeze_bn"])
@pytest.mark.parametrize("training", [True, False])
def test_float_state_matches_float_model(qat_mode, training, seed):
    model = ConvBnReLU(bias=False).double()
    _randomize_bn(model.bn)
    x = model.example().double()
    prepared = prepare(model, x, method="fx", qat_mode=qat_mode)
    set_fake_quantize(prepared, "float")
    ref = copy.deepcopy(model).train(training)
    if qat_mode == "freeze_bn":
        ref.bn.eval()
    prepared.train(training)
    torch.testing.assert_close(prepared(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("qat_mode", ["fuse_bn", "with_bn", "freeze_bn"])
def test_bn_gamma_zero_gives_no_nan(qat_mode, seed):
    model = ConvBnReLU().double()
    _randomize_bn(model.bn)
    with torch.no_grad():
        model.bn.weight[1] = 0.0
    x = model.example().double()
    for training in (True, False):
        prepared = prepare(model, x, method="fx", qat_mode=qat_mode)
        for state in ("calibration", "qat", "validation"):
            set_fake_quantize(prepared, state)
            prepared.train(training)
            assert torch.isfinite(prepared(x)).all(), (training, state)
        prepared = prepare(model, x, method="fx", qat_mode=qat_mode)
        _identity_quant(prepared)
        prepared.train(training)
        ref = copy.deepcopy(model).train(training)
        if qat_mode == "freeze_bn":
            ref.bn.eval()
        torch.testing.assert_close(prepared(x), ref(x), rtol=1e-10, atol=1e-10)


def test_fuse_bn_weight_node_sees_folded_weight(seed):
    model = ConvBnReLU()
    _randomize_bn(model.bn)
    x = model.example()
    prepared = prepare(model, x, method="fx", qat_mode="fuse_bn").train()
    op = _fused_op(prepared)
    set_fake_quantize(prepared, "qat")
    bn = op.bn
    folded = op.conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    expected = folded.detach().abs().amax(dim=(1, 2, 3)) / 127  # running stats before this batch
    prepared(x)
    torch.testing.assert_close(op.weight_quant.scale, expected, rtol=1e-5, atol=1e-8)


def test_with_bn_weight_node_sees_raw_weight(seed):
    model = ConvBnReLU()
    _randomize_bn(model.bn)
    prepared = prepare(model, model.example(), method="fx", qat_mode="with_bn").train()
    op = _fused_op(prepared)
    prepared(model.example())
    expected = op.conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
    torch.testing.assert_close(op.weight_quant.scale, expected, rtol=1e-5, atol=1e-8)


def test_freeze_bn_keeps_running_stats(seed):
    model = ConvBnReLU()
    prepared = prepare(model, model.example(), method="fx", qat_mode="freeze_bn").train()
    op = _fused_op(prepared)
    before = op.bn.running_mean.clone()
    prepared(model.example())
    assert torch.equal(op.bn.running_mean, before)
    assert not op.bn.training and op.training


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_fuse(dims, seed):
    model = ConvBnReLU(dims=dims).eval()
    x = model.example()
    prepared = prepare(model, x, method="fx")
    assert _fused_op(prepared).op_info.op_type == f"ConvBnReLU{dims}d"
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)


class LinearModels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.relu(self.conv(x.view(-1, 2, 2, 2)))
        return x.flatten(1)


def test_linear_bn_linear_relu_conv_relu(seed):
    model = LinearModels()
    _randomize_bn(model.bn1)
    model.eval()
    x = torch.randn(4, 8)
    prepared = prepare(model, x, method="fx")
    ops = dict(iter_quant_ops(prepared))
    assert ops["fc1"].op_info.op_type == "LinearBn1d" and isinstance(ops["fc1"], QatConvBn)
    assert ops["fc2"].op_info.op_type == "LinearReLU" and isinstance(ops["fc2"], QatGemm) and ops["fc2"].relu
    assert ops["conv"].op_info.op_type == "ConvReLU2d"
    # torch.relu at the root is named like a functional op; "relu" is taken by the nn.ReLU child
    assert ("fc2", "relu_1") in prepared.prepare_record.fused
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    prepared = prepare(model, x, method="fx").train()
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), copy.deepcopy(model).train()(x), rtol=1e-5, atol=1e-6)


class SharedBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y3 = self.conv3(x)
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x)) + self.relu(y3) + y3


def test_unfused_reasons_recorded(seed):
    model = SharedBn().eval()
    prepared = prepare(model, torch.randn(2, 3, 4, 4), method="fx")
    record = prepared.prepare_record
    assert record.fused == ()
    assert ("conv1", "bn") in record.unfused and ("conv2", "bn#1") in record.unfused
    assert ("conv3", "relu") in record.unfused
    assert any("bn is called 2 times" in n for n in record.notes)
    assert any("conv3 has 2 users" in n for n in record.notes)
    assert "bn#1" in prepared.quant_op_order  # unfused BN: its own op per call site


def test_eval_fold_is_reused_only_inside_frozen_parameters(seed):
    model = ConvBnReLU()
    _randomize_bn(model.bn)
    model.eval()
    x = model.example()
    prepared = prepare(model, x, method="fx").eval()
    set_fake_quantize(prepared, "float")
    op = _fused_op(prepared)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)  # folded every forward
        assert "_fold_cache" not in op.__dict__
        with frozen_parameters(prepared), frozen_parameters(prepared):  # nested: fine
            torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)
            assert "_fold_cache" in op.__dict__
            op.bn.running_mean.add_(0.5)  # in-place change: the kept fold must not be reused
            model.bn.running_mean.add_(0.5)
            torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)
            op.bn.running_var = op.bn.running_var * 2  # a new tensor: seen by identity, whatever its version
            model.bn.running_var = model.bn.running_var * 2
            torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)
            assert "_fold_cache" not in _fused_op(copy.deepcopy(prepared)).__dict__
        assert "_fold_cache" not in op.__dict__ and "_reuse_fold" not in op.__dict__
    out = prepared(x)  # autograd on: computed, not cached, and differentiable
    out.sum().backward()
    assert op.bn.weight.grad is not None and op.conv.weight.grad is not None


def test_frozen_parameters_needs_a_module():
    with pytest.raises(TypeError, match="needs an nn.Module, got dict"), frozen_parameters({}):
        pass


@pytest.mark.parametrize("state", ["float", "validation"])
def test_an_edit_through_data_is_seen_in_eval(seed, state):
    """A change through ``.data`` moves no version: outside frozen_parameters nothing stale is reused."""
    model = ConvBnReLU()
    _randomize_bn(model.bn)
    x = model.example()
    prepared = prepare(model, x, method="fx")
    set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        prepared(x)
    set_fake_quantize(prepared, state)
    prepared.eval()
    op = _fused_op(prepared)
    with torch.no_grad():
        before = prepared(x)
        op.conv.weight.data.mul_(0.5)
        op.bn.running_var.data.mul_(4.0)
        after = prepared(x)
        fresh = copy.deepcopy(prepared)(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)
