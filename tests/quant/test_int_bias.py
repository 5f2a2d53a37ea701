"""The deployed int32 bias in fake quant (VALIDATION): float64 reference, switch, export to onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.nodes.int_bias import INT32_MAX, deployed_bias, round_bias, set_int_bias
from qat_lightning.quant.nodes.qat_modules import fold_bn
from qat_lightning.quant.ops import iter_quant_ops

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvLinear(nn.Module):
    """conv + BN (folded) -> relu -> linear, with biases large against the int32 step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 6 * 6, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.fc.bias.mul_(30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _calibrated(setter=None, int_bias=True):
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    p = ql.prepare(ConvLinear().eval(), (xs[0],), qconfig_setter=setter, int_bias=int_bias).eval()
    ql.set_fake_quantize(p, "calibration")
    with torch.no_grad():
        for x in xs:
            p(x)
    ql.set_fake_quantize(p, "validation")
    return p, xs


def _reference(bias, s_in, s_w):
    s = s_in.double().reshape(-1) * s_w.double().reshape(-1)
    return (np.round(bias.double().numpy() / s.numpy()) * s.numpy()).astype(np.float64)


@pytest.mark.parametrize("per_channel", [True, False])
def test_round_bias_float64_reference(per_channel):
    torch.manual_seed(1)
    bias = torch.randn(8) * 3
    s_in = torch.tensor(0.0137)
    s_w = torch.rand(8) * 0.01 + 1e-3 if per_channel else torch.tensor([0.0042])
    got = round_bias(bias, s_in, s_w)
    np.testing.assert_allclose(got.double().numpy(), _reference(bias, s_in, s_w), rtol=1e-6, atol=1e-9)
    codes = got.double() / (s_in * s_w).reshape(-1).double()
    assert torch.all((codes - codes.round()).abs() < 1e-2)  # on the int32 grid (float32 bias)
    huge = round_bias(torch.full((1,), 1e9), torch.tensor(1e-4), torch.tensor([1e-4]))
    assert huge.item() == pytest.approx(INT32_MAX * 1e-8, rel=1e-6)  # saturated to int32


def test_conv_bn_and_linear_validation_use_the_deployed_bias():
    p, xs = _calibrated()
    ops = dict(iter_quant_ops(p))
    conv, fc = ops["conv"], ops["fc"]
    folded_w, folded_b = fold_bn(conv.conv.weight, conv.conv.bias, conv.bn)
    x_node = conv.input_quant[0] if conv.input_quant[0].dtype.is_integer else ops["x_quant"].output_quant
    ref = _reference(folded_b.detach(), x_node.scale, conv.weight_quant.scale)
    np.testing.assert_allclose(deployed_bias(conv, folded_b).detach().double().numpy(), ref, rtol=1e-6)
    fc_in = fc.__dict__["_bias_producer"]  # the fc input is the relu's output, quantized there
    assert fc_in.dtype.is_integer
    ref = _reference(fc.module.bias.detach(), fc_in.scale, fc.weight_quant.scale)
    assert np.abs(ref - fc.module.bias.detach().double().numpy()).max() > 0  # the rounding is not a no-op
    with torch.no_grad():
        x = xs[1]
        h = torch.relu(conv(ops["x_quant"](x))).flatten(1)  # conv's output node applied inside
        h = fc_in(h)
        w = fc.weight_quant(fc.module.weight)
        want = fc.output_quant(F.linear(h.double(), w.double(), torch.from_numpy(ref)).float())
        np.testing.assert_allclose(p(x).numpy(), want.numpy(), atol=1e-6)
        set_int_bias(p, False)
        assert deployed_bias(fc, fc.module.bias) is fc.module.bias


def test_float_bias_outside_validation_and_for_fp16_inputs():
    p, _ = _calibrated()
    fc = dict(iter_quant_ops(p))["fc"]
    for state in ("qat", "calibration", "float"):
        ql.set_fake_quantize(p, state)
        assert deployed_bias(fc, fc.module.bias) is fc.module.bias
    fp16, _ = _calibrated(ql.get_qconfig(in_dtype=ql.float16, out_dtype=ql.float16))
    for _, op in iter_quant_ops(fp16):
        if hasattr(type(op), "int_bias"):
            bias = op.module.bias if hasattr(op, "module") else op.conv.bias
            assert deployed_bias(op, bias) is bias


def test_switch_is_validated():
    with pytest.raises(TypeError, match="int_bias must be True or False"):
        ql.prepare(ConvLinear().eval(), torch.randn(1, 3, 8, 8), int_bias="yes")
    p, _ = _calibrated(int_bias=False)
    assert all(not op.int_bias for _, op in iter_quant_ops(p) if hasattr(type(op), "int_bias"))
    with pytest.raises(TypeError, match="int_bias must be True or False"):
        set_int_bias(p, 1)


def test_compile_fullgraph_validation_matches_eager():
    p, xs = _calibrated()
    with torch.no_grad():
        want = p(xs[1])
        got = torch.compile(p, fullgraph=True, backend="eager")(xs[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("int_bias", [True, False])
def test_export_matches_onnxruntime_all_optimizations(tmp_path, int_bias):
    """int8 inputs, int16 outputs: the int32 bias rounding onnxruntime applies is visible at the output."""
    pytest.importorskip("onnxruntime")
    from qat_lightning.analysis.export_check import check_export
    from qat_lightning.quant.export import export_onnx

    p, xs = _calibrated(ql.get_qconfig(in_dtype=ql.qint8, out_dtype=ql.qint16), int_bias=int_bias)
    export_onnx(p, (xs[0],), tmp_path / "m.onnx")
    step = list(iter_quant_ops(p))[-1][1].output_quant.scale.item()
    check = check_export(p, tmp_path / "m.onnx", xs, optimization="all", out_dir=tmp_path)
    (out,) = check.outputs
    (unopt,) = check.unoptimized
    if int_bias:  # the deployed graph computes what fake quant computes, at both levels
        assert out.max_abs_error == 0.0 and unopt.max_abs_error == 0.0
    else:  # the float bias fake quant keeps is rounded by onnxruntime: outputs move by output steps
        assert unopt.max_abs_error == 0.0
        assert out.max_abs_error >= step
