"""export_onnx: QDQ graphs checked in onnxruntime against the fake-quant model (VALIDATION)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant import quant_nodes_of
from qat_lightning.quant.export import ExportError, export_onnx, read_encodings
from qat_lightning.quant.nodes.qat_modules import fold_bn
from tests.models import TinyResNet, bert_inputs, tiny_bert

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402


def _calibrated(model, example, batches, setter=None, method="auto"):
    prepared = ql.prepare(model, example_inputs=example, qconfig_setter=setter, method=method).eval()
    ql.set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        for b in batches:
            prepared(**b) if isinstance(b, dict) else prepared(b)
    ql.set_fake_quantize(prepared, "validation")
    return prepared


def _run_ort(path, feeds, default_session=False):
    # onnxruntime#25526: its QDQ propagation + S8->U8 rewrite rejects some opset-21 int8 graphs
    disabled = None if default_session else ["QDQS8ToU8Transformer"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    names = [i.name for i in sess.get_inputs()]
    if not isinstance(feeds, dict):
        feeds = dict(zip(names, feeds, strict=True))
    return sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})


def _graph(path):
    return onnx.load(str(path)).graph


def _cnn(setter=None, method="auto"):
    xs = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    return _calibrated(TinyResNet().eval(), (xs[0],), xs, setter, method), xs


@pytest.mark.parametrize(
    ("dtype", "onnx_type"), [(ql.qint8, TensorProto.INT8), (ql.qint16, TensorProto.INT16)]
)
def test_cnn_round_trip_per_dtype(tmp_path, dtype, onnx_type):
    model, xs = _cnn(ql.get_qconfig(weight_dtype=dtype, out_dtype=dtype))
    result = export_onnx(model, (xs[0],), tmp_path / "cnn.onnx")
    graph = _graph(result.path)
    inits = {i.name: i for i in graph.initializer}
    zps = [inits[n.input[2]] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert zps and all(z.data_type == onnx_type for z in zps)  # int16 really int16 in the graph
    assert result.num_qdq == sum(1 for _, n in ql.iter_fake_quantize(model) if n.dtype.is_integer)
    assert not [i for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 4]
    with torch.no_grad():
        ref = model(xs[1])
    (got,) = _run_ort(result.path, (xs[1],))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_fused_conv_bn_exported_folded_with_per_channel_int_weights(tmp_path):
    model, xs = _cnn()
    export_onnx(model, (xs[0],), tmp_path / "cnn.onnx")
    graph = _graph(tmp_path / "cnn.onnx")
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    op = dict(ql.iter_quant_ops(model))["conv1"]  # conv1 + bn1 + relu, fused by prepare
    wq = quant_nodes_of(op)["weight"]
    enc = {e.node: e for e in read_encodings(tmp_path / "cnn.onnx")}
    entry = next(e for e in enc.values() if e.op_name == "conv1" and e.role == "weight")
    assert entry.axis == 0 and entry.constant
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    codes = inits[entry.onnx_quantized_tensors[0]]
    assert codes.dtype == np.int8
    dq = next(n for n in graph.node if n.output[0] == entry.onnx_tensors[0])
    assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute}["axis"] == 0
    w, _ = fold_bn(op.conv.weight, op.conv.bias, op.bn)
    with torch.no_grad():
        expected = wq(w)  # the fake-quant folded weight of the VALIDATION model
    scale = inits[dq.input[1]].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(codes.astype(np.float32) * scale, expected.numpy(), rtol=0, atol=1e-7)


def test_fp16_points_are_cast_pairs(tmp_path):
    model, xs = _cnn(ql.ModuleNameTemplate({"": ql.float16}))
    result = export_onnx(model, (xs[0],), tmp_path / "fp16.onnx")
    casts = [n for n in _graph(result.path).node if n.op_type == "Cast"]
    to16 = [n for n in casts if n.attribute[0].i == TensorProto.FLOAT16]
    fp16_points = sum(1 for _, n in ql.iter_fake_quantize(model) if n.dtype.is_float16)
    assert fp16_points and result.num_fp16_casts == fp16_points and len(to16) >= fp16_points
    with torch.no_grad():
        ref = model(xs[1])
    (got,) = _run_ort(result.path, (xs[1],))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-3, atol=1e-3)


def test_eager_prepare_path(tmp_path):
    model, xs = _cnn(method="eager")
    assert model.prepare_record.method == "eager"
    result = export_onnx(model, (xs[0],), tmp_path / "eager.onnx")
    with torch.no_grad():
        ref = model(xs[1])
    (got,) = _run_ort(result.path, (xs[1],))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_batch(tmp_path, dynamic):
    model, xs = _cnn()
    result = export_onnx(model, (xs[0][:2],), tmp_path / "m.onnx", dynamic_batch=dynamic)
    dim0 = _graph(result.path).input[0].type.tensor_type.shape.dim[0]
    assert (dim0.dim_param == "batch") if dynamic else (dim0.dim_value == 2)
    if dynamic:
        (got,) = _run_ort(result.path, (torch.randn(5, 3, 16, 16),))
        assert got.shape == (5, 10)


def test_encodings_match_the_model_buffers(tmp_path):
    model, xs = _cnn(ql.ConvDtypeTemplate(input_dtype=ql.qint16, weight_dtype=ql.qint8))
    next(n for _, n in ql.iter_fake_quantize(model) if n.ch_axis is None).fix_scale()
    result = export_onnx(model, (xs[0],), tmp_path / "m.onnx")
    doc = json.loads(result.encodings_path.read_text())
    assert doc["opset"] == 21 and result.encodings_path == tmp_path / "m.encodings.json"
    nodes = dict(ql.iter_fake_quantize(model))
    owners = {
        id(n): (op, role) for op, m in ql.iter_quant_ops(model) for role, n in quant_nodes_of(m).items()
    }
    graph = _graph(result.path)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq_by_out = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    encodings = read_encodings(result.path)
    assert {e.node for e in encodings} == set(nodes)
    for e in encodings:
        node = nodes[e.node]
        assert (e.op_name, e.role) == owners[id(node)]
        assert e.dtype == node.dtype.name and e.axis == node.ch_axis and e.fixed == node.is_fixed
        if not node.dtype.is_integer:
            continue
        np.testing.assert_array_equal(np.asarray(e.scale, np.float32), node.scale.numpy().reshape(-1))
        assert e.zero_point == 0 and e.onnx_tensors
        for t in e.onnx_tensors:
            np.testing.assert_array_equal(
                inits[dq_by_out[t].input[1]].reshape(-1), node.scale.numpy().reshape(-1)
            )
    assert any(e.fixed for e in encodings)
    assert Counter(e.dtype for e in encodings)["qint16"] > 0


def test_learned_scales_are_exported_as_trained(tmp_path):
    """An optimizer step moves a learned (LSQ) scale's parameter; the export must not use a stale buffer."""
    model, xs = _cnn()
    params = ql.set_qat_scales(model, "learned")
    ql.set_fake_quantize(model, "qat")
    model.train()
    optimizer = torch.optim.SGD(params, lr=1e-2)
    model(xs[0]).square().mean().backward()
    optimizer.step()  # the parameters moved; the nodes' scale buffers were filled before the step
    model.eval()
    ql.set_fake_quantize(model, "validation")
    learned = {name: node for name, node in ql.iter_fake_quantize(model) if node.scale_mode == "learned"}
    result = export_onnx(model, (xs[0],), tmp_path / "m.onnx")
    scales = {e.node: e.scale for e in read_encodings(result.path)}
    assert learned
    for name, node in learned.items():
        assert list(scales[name]) == [float(node.scale_param.detach().abs())], name
    with torch.no_grad():
        ref = model(xs[1])
    np.testing.assert_array_equal(_run_ort(result.path, [xs[1]])[0], ref.numpy())


def test_model_is_left_unchanged(tmp_path):
    model, xs = _cnn()
    ql.set_fake_quantize(model, "qat")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, (xs[0],), tmp_path / "m.onnx")
    assert model.training and all(n.state is ql.FakeQuantState.QAT for _, n in ql.iter_fake_quantize(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(n._forward_hooks for _, n in ql.iter_fake_quantize(model))


def test_torch_transformer_encoder(tmp_path):
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    xs = [torch.randn(3, 5, 16) for _ in range(3)]
    model = _calibrated(encoder, (xs[0],), xs)
    result = export_onnx(model, (xs[0],), tmp_path / "enc.onnx")
    assert result.num_qdq > 0
    # the two layers start as copies: the exporter aliases layer 1's weights (Identity); still int8 here
    graph = _graph(result.path)
    float_ffn = [i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2]
    assert not float_ffn, float_ffn  # attention (decomposed at prepare) is int8 too
    with torch.no_grad():
        ref = model(xs[1]).numpy()
    (got,) = _run_ort(result.path, (xs[1],))
    # onnxruntime fuses DequantizeLinear -> Softmax -> QuantizeLinear into its integer QLinearSoftmax, whose
    # table puts some probabilities one step from the fake-quant softmax: compare as check_export does
    cosine = float((got * ref).sum() / np.sqrt((got * got).sum() * (ref * ref).sum()))
    assert cosine > 0.999


def test_hf_bert_keyword_inputs(tmp_path):
    batches = [bert_inputs(2, 8) for _ in range(3)]
    model = _calibrated(tiny_bert(), batches[0], batches)
    result = export_onnx(model, batches[0], tmp_path / "bert.onnx")
    assert result.input_names == ("input_ids",)
    assert result.output_names == ("last_hidden_state", "pooler_output")
    with torch.no_grad():
        ref = model(**batches[1])
    got = _run_ort(result.path, batches[1])
    np.testing.assert_allclose(got[0], ref.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    old = export_onnx(model, batches[0], tmp_path / "bert20.onnx", opset=20)  # int8: opset 20 possible
    assert onnx.load(str(old.path)).opset_import[0].version == 20
    got20 = _run_ort(old.path, batches[1], default_session=True)  # loads in a default session
    np.testing.assert_allclose(got20[0], got[0], rtol=0, atol=0)


class _Bessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.special.i0(self.conv(x))


def test_unsupported_op_is_named_and_nothing_is_written(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = _calibrated(_Bessel(), (x,), [x])
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(ExportError, match=r"aten::i0"):
        export_onnx(model, (x,), target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_bad_input_is_refused_before_writing(tmp_path):
    model, xs = _cnn()
    with pytest.raises(ExportError, match="no quant nodes"):
        export_onnx(TinyResNet(), (xs[0],), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="allowed: 20, 21"):  # a bad argument, not an export failure
        export_onnx(model, (xs[0],), tmp_path / "m.onnx", opset=13)
    with pytest.raises(ExportError, match="not a writable directory"):
        export_onnx(model, (xs[0],), tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="must end with .onnx"):
        export_onnx(model, (xs[0],), tmp_path / "m.bin")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(model, "x", tmp_path / "m.onnx")
    int16, _ = _cnn(ql.get_qconfig(out_dtype=ql.qint16))
    with pytest.raises(ExportError, match="int16 quant points need opset >= 21"):
        export_onnx(int16, (xs[0],), tmp_path / "m.onnx", opset=20)
    cold = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0],))
    with pytest.raises(ExportError, match="without a scale.*conv1"):
        export_onnx(cold, (xs[0],), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
