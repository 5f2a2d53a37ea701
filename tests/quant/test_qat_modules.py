"""Op modules: conv-transpose / functional gemm weights, methods, sdpa decomposition, eager call sites."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.quant.nodes.fake_quantize import set_fake_quantize
from qat_lightning.quant.nodes.qat_modules import QatConvBn, QatFunction, QatInput, fold_bn
from qat_lightning.quant.ops import OpInfo, OpKind, iter_quant_ops
from qat_lightning.quant.preparation.prepare import prepare
from qat_lightning.quant.qconfig.qconfig import get_qconfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add barrier waits


class Up(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x, output_size=[x.shape[2] * 2, x.shape[3] * 2])
        y = F.linear(y.permute(0, 2, 3, 1), self.weight)
        return y.matmul(y.transpose(-1, -2)).softmax(-1)


def test_conv_transpose_functional_linear_and_methods(seed):
    model = Up().eval()
    x = torch.randn(2, 4, 5, 5)
    prepared = prepare(model, x, method="fx")
    assert prepared.quant_op_order == ["x_quant", "up", "linear", "matmul", "softmax"]
    ops = dict(iter_quant_ops(prepared))
    up = ops["up"]
    assert up.weight_quant.ch_axis == 1 and up.weight_quant.scale.shape == (6,)
    assert up.op_info.flops == 2 * 4 * 5 * 5 * 6 * 9  # input numel * out_ch * kernel
    linear = ops["linear"]
    assert (
        isinstance(linear, QatFunction)
        and linear.op_info.kind == OpKind.GEMM
        and not linear.op_info.is_matmul
    )
    assert linear.weight_quant.ch_axis == 0 and linear.weight_quant.scale.shape == (5,)
    assert linear.op_info.input_producers == ("up",)
    assert ops["matmul"].op_info.is_matmul and ops["matmul"].op_info.input_producers == ("linear", "linear")
    assert ops["softmax"].op_info.kind == OpKind.OTHER and ops["softmax"].is_method
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x))
    x2 = torch.randn(1, 4, 7, 7)  # output_size follows the input
    torch.testing.assert_close(prepared(x2), model(x2))
    set_fake_quantize(prepared, "calibration")
    prepared(x)
    set_fake_quantize(prepared, "validation")
    assert not torch.equal(prepared(x), model(x))


class Sdpa(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.causal = causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_is_decomposed(causal, seed):
    model = Sdpa(causal).eval()
    x = torch.randn(2, 6, 8)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    prepared = prepare(model, (x, mask), method="fx")
    # the eager attention's ops: the scale is a mul op, the mask a float32 add (prepare_record.float_ops)
    assert prepared.quant_op_order == ["x_quant", "qkv", "matmul", "mul", "softmax", "matmul_1"]
    assert [op.name for op in prepared.prepare_record.float_ops] == ["add"]
    ops = dict(iter_quant_ops(prepared))
    assert ops["matmul"].op_info.input_producers == ("qkv", "qkv")
    assert ops["matmul_1"].op_info.input_producers == ("softmax", "qkv")
    assert ops["matmul"].op_info.flops == 2 * 2 * 6 * 6 * 4
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x) * 10)


def test_eager_call_sites_dispatch_per_forward(seed):
    model = Shared()
    x = torch.randn(3, 4)
    prepared = prepare(model, x, method="eager")
    assert prepared.quant_op_order == ["x_quant", "lin", "lin#1"]
    first, second = prepared.lin, prepared.get_submodule("lin#1")
    set_fake_quantize(prepared, "calibration")
    for _ in range(3):
        prepared(x)
    assert int(first.output_quant.observer.num_batches) == 3
    assert int(second.output_quant.observer.num_batches) == 3
    assert float(second.output_quant.scale) > 5 * float(first.output_quant.scale)  # the x10 call site
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x))


def test_quant_input_passes_non_float_through():
    info = OpInfo("ids_quant", "quant", OpKind.INPUT, "")
    op = QatInput(info, get_qconfig().activation_fake_quant(get_qconfig().output_dtype, "ids_quant.output"))
    ids = torch.arange(5)
    assert op(ids) is ids


def test_fold_bn_gamma_zero():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([1.0, 0.0, 4.0]))
    w, b = fold_bn(torch.ones(3, 2, 1, 1), None, bn)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    assert torch.equal(w[1], torch.zeros(2, 1, 1)) and float(b[1].detach()) == pytest.approx(0.2)


def test_conv_bn_rejects_unknown_mode():
    conv, bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
    qc = get_qconfig()
    info = OpInfo("c", "ConvBn2d", OpKind.GEMM, "c")
    with pytest.raises(ValueError, match="fuse_bn, with_bn, freeze_bn"):
        QatConvBn(info, conv, bn, "conv", "frozen", [], qc.weight_fake_quant(1), None)


def test_torch_transformer_encoder_is_traced_through(seed):
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    prepared = prepare(model, x, method="fx")
    ops = dict(iter_quant_ops(prepared))
    assert ops["layers.0.linear1"].op_info.op_type == "LinearReLU"  # F.relu of the layer, fused
    assert "layers.1.norm2" in ops and "layers.0.add" in ops
    assert "layers.0.self_attn.qk_matmul" in ops and prepared.prepare_record.float_ops == ()  # decomposed
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)
