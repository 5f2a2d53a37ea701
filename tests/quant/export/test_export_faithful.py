"""export_onnx writes what the fake-quant model computes and leaves the model as it was.

Frozen BatchNorms stay frozen, the fp16 norm simulation is exported, ``FakeCast`` / ``GlobalFakeQuantSwitch``
flipped inside ``forward`` are followed, the float16 points are placed in the encodings and counted, and a
node without a scale because of the switch is named as such.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.calibrate import calibrate
from qat_lightning.quant.export import ExportError, export_onnx, read_encodings
from qat_lightning.quant.nodes.fp16_norm import norm_input_scale
from tests.models import TinyResNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto  # noqa: E402

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _prepared(net, xs, setter=None, **kwargs):
    model = ql.prepare(net.eval(), example_inputs=(xs[0],), qconfig_setter=setter, **kwargs).eval()
    calibrate(model, xs)  # leaves it in VALIDATION
    return model


def _casts(path, to):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "Cast" and n.attribute[0].i == to]


# ------------------------------------------------------------------ item 1: frozen BatchNorms
def test_frozen_batchnorms_stay_frozen(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    model = _prepared(TinyResNet(), xs, qat_mode="with_bn")
    model.train()
    ql.set_fake_quantize(model, "qat")
    ql.freeze_batchnorm(model)
    flags = {name: m.training for name, m in model.named_modules()}
    bns = [m for m in model.modules() if isinstance(m, BN)]
    stats = [m.running_mean.clone() for m in bns]
    assert bns and not any(m.training for m in bns) and model.training

    export_onnx(model, (xs[0],), tmp_path / "m.onnx")

    assert {name: m.training for name, m in model.named_modules()} == flags
    model(xs[1] * 3 + 1)  # one more QAT step: the frozen statistics must not move
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats, strict=True))


# ------------------------------------------------------------------ item 3: fp16 norm simulation
class _NormNet(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16) if norm == "layer" else nn.GroupNorm(4, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def _fp16_setter():
    return ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(),
        templates=[
            ql.ModuleNameTemplate({"": ql.float16}),
            ql.ConvDtypeTemplate(input_dtype=ql.qint16, weight_dtype=ql.qint16),
        ],
    )


@pytest.mark.parametrize(("norm", "scaling"), [("layer", False), ("layer", True), ("group", False)])
def test_fp16_norm_is_exported_as_simulated(tmp_path, norm, scaling):
    """Inputs with ``|x - mean| > 256``: the fp16 squares saturate in fake quant, and must in ONNX too."""
    torch.manual_seed(0)
    net = _NormNet(norm)
    with torch.no_grad():
        net.a.weight.mul_(300.0)
        net.a.bias.add_(300.0)
    xs = [torch.randn(32, 16) for _ in range(2)]
    model = _prepared(net, xs, _fp16_setter())
    ql.set_fp16_norm_scaling(model, scaling)
    result = export_onnx(model, (xs[0],), tmp_path / "n.onnx")
    with torch.no_grad():
        ref = model(xs[1]).numpy()
        float_out = net(xs[1]).numpy()
    got = _ort(result.path, xs[1])
    err = float(np.abs(got - ref).max())
    assert err <= 2e-3 * float(np.abs(ref).max()), err
    if not scaling:  # the saturation is real: fake quant is far from float, and ONNX follows it
        assert float(np.abs(ref - float_out).max()) > 50 * err
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert not ops & {"LayerNormalization", "GroupNormalization", "InstanceNormalization"}
    assert len(_casts(result.path, TensorProto.FLOAT16)) > result.num_fp16_casts  # the steps, in fp16


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_fp16_norm_scaling_is_per_group_in_onnx_too(tmp_path, norm):
    """Quiet rows / groups beside an outlier: the input factor is one per normalization group in fake
    quant (an outlier's factor no longer flushes a quiet row's squares), and the export follows it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, generator=g)
    x[0] *= 0.003
    x[1] *= 0.01
    x[2, 0] = 1500.0
    if norm == "layer":
        net, ref = nn.LayerNorm(16), torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-5)
    else:
        x = x.reshape(3, 16, 1)
        net, ref = nn.GroupNorm(4, 16), torch.nn.functional.group_norm(x.double(), 4, eps=1e-5)
    setter = ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(), templates=[ql.ModuleNameTemplate({"": ql.float16})]
    )
    model = _prepared(net, [x], setter)
    result = export_onnx(model, (x,), tmp_path / "n.onnx")
    with torch.no_grad():
        fq = model(x).double()
    got = torch.from_numpy(_ort(result.path, x)).double()
    assert torch.equal(got, fq)  # ONNX runs the fake-quant steps
    assert float((fq - ref).abs().max()) < 5e-3  # every row right, the quiet ones included


def test_exported_input_scale_is_exact_in_onnxruntime(tmp_path):
    """``k`` is a power of two chosen at ``max|x| / 64``; onnxruntime's Log / Div must not shift it."""
    from qat_lightning.quant.export.norms import export_input_scale

    class _K(nn.Module):
        def forward(self, x):
            return export_input_scale(x).reshape(1)

    amaxes = [0.0, 1.0, 63.97, 64.0, 64.06, 128.0, 255.9, 256.0, 4096.0, 16384.0, 32768.0, 65504.0]
    path = tmp_path / "k.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(_K(), (torch.ones(3),), str(path), dynamo=False, input_names=["x"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for amax in amaxes:
        x = torch.tensor([amax, -amax / 3, 0.5], dtype=torch.float16).float()
        (got,) = sess.run(None, {"x": x.numpy()})
        assert float(got[0]) == float(norm_input_scale(x)), amax


# ------------------------------------------------------------------ item 4: switches and fp16 placements
class _SwitchNet(nn.Module):
    """``b`` runs with a switch off inside the forward (the seed's partial-quantization idiom)."""

    def __init__(self, switch: type, active: bool = True) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.switch = switch
        self.active = active

    def forward(self, x):
        x = self.a(x)
        if self.active:
            self.switch.disable()
        x = self.b(x)
        if self.active:
            self.switch.enable()
        return self.c(x)


def _switch_model(switch, setter=None, method="auto", active=True):
    torch.manual_seed(0)
    net = _SwitchNet(switch, active)
    xs = [torch.randn(64, 16) for _ in range(3)]
    model = _prepared(net, xs, setter, method=method)
    model.active = True  # eager runs this forward: switched after calibration, every node has a scale
    return model, xs


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_fake_cast_switch_inside_forward_is_followed(tmp_path, method):
    setter = ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(),
        templates=[ql.ModuleNameTemplate({"b": ql.float16, "c": ql.float16})],
    )
    model, xs = _switch_model(ql.FakeCast, setter, method)
    result = export_onnx(model, (xs[0],), tmp_path / "s.onnx")
    with torch.no_grad():
        ref = model(xs[1]).numpy()
    np.testing.assert_allclose(_ort(result.path, xs[1]), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    assert ql.FakeCast.enabled()

    # b's output is float in fake quant (FakeCast off): no Cast pair; c's output is one
    enc = {e.node: e for e in read_encodings(result.path)}
    assert enc["b.output_quant"].dtype == "float16" and enc["b.output_quant"].onnx_tensors == ()
    to16, to32 = _casts(result.path, TensorProto.FLOAT16), _casts(result.path, TensorProto.FLOAT)
    assert result.num_fp16_casts == len(to16) == len(to32) == 1
    placed = [
        (t, q)
        for e in enc.values()
        if e.dtype == "float16"
        for t, q in zip(e.onnx_tensors, e.onnx_quantized_tensors, strict=True)
    ]
    assert placed == [(to32[0].output[0], to16[0].output[0])] and to32[0].input[0] == to16[0].output[0]
    assert enc["c.output_quant"].onnx_tensors == (to32[0].output[0],)


def test_global_switch_inside_forward_is_followed(tmp_path):
    model, xs = _switch_model(ql.GlobalFakeQuantSwitch, method="eager", active=False)
    assert model.prepare_record.method == "eager"
    result = export_onnx(model, (xs[0],), tmp_path / "g.onnx")
    with torch.no_grad():
        ref = model(xs[1]).numpy()
    np.testing.assert_allclose(_ort(result.path, xs[1]), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    enc = {e.node: e for e in result.encodings}
    assert enc["b.weight_quant"].onnx_tensors == () and enc["c.weight_quant"].onnx_tensors
    dq = [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "DequantizeLinear"]
    assert result.num_qdq == len(dq) == sum(len(e.onnx_tensors) for e in enc.values())


# ------------------------------------------------------------------ item 5: the no-scale message
def test_node_without_scale_because_of_the_switch_is_explained(tmp_path):
    torch.manual_seed(0)
    net = _SwitchNet(ql.GlobalFakeQuantSwitch)  # on during calibration too: b's nodes observe nothing
    xs = [torch.randn(8, 16) for _ in range(2)]
    model = _prepared(net, xs)
    with pytest.raises(
        ExportError, match=r"without a scale.*b\.weight_quant.*GlobalFakeQuantSwitch is disabled"
    ):
        export_onnx(model, (xs[0],), tmp_path / "m.onnx")
    assert ql.GlobalFakeQuantSwitch.enabled() and list(tmp_path.iterdir()) == []
    cold = ql.prepare(TinyResNet().eval(), example_inputs=(torch.randn(2, 3, 16, 16),))
    with pytest.raises(ExportError, match="without a scale") as info:
        export_onnx(cold, (torch.randn(2, 3, 16, 16),), tmp_path / "m.onnx")
    assert "GlobalFakeQuantSwitch" not in str(info.value)  # an uncalibrated model: the plain message
