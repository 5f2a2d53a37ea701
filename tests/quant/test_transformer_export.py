"""Exported transformers keep attention and embedding weights as int8 initializers; onnxruntime agrees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis import check_export
from qat_lightning.quant.calibrate import calibrate
from qat_lightning.quant.export import export_onnx
from tests.models import bert_inputs, tiny_bert

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(model, example, batches):
    prepared = ql.prepare(model, example_inputs=example).eval()
    calibrate(prepared, batches)  # leaves it in VALIDATION
    return prepared


def _weight_dtypes(path):
    """Data type of every 2-D initializer with at least 32 x 32 elements (the weight matrices)."""
    graph = onnx.load(str(path)).graph
    return {
        i.name: i.data_type for i in graph.initializer if len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 1024
    }


def test_encoder_attention_weights_export_as_int8(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    for sub in encoder.layers:  # distinct layers (the clones start equal)
        sub.self_attn._reset_parameters()
        sub.self_attn.out_proj.reset_parameters()  # not reset by _reset_parameters
    xs = [torch.randn(3, 6, 32) for _ in range(4)]
    model = _calibrated(encoder, (xs[0],), xs[:2])
    result = export_onnx(model, (xs[0],), tmp_path / "enc.onnx")
    dtypes = _weight_dtypes(result.path)
    attn = [n for n in dtypes if "self_attn" in n]
    assert len(attn) == 2 * 4  # q, k, v, out per layer
    assert set(dtypes.values()) == {TensorProto.INT8}, dtypes
    check = check_export(model, result.path, xs[2:], out_dir=tmp_path)
    assert check.passed, check


def test_bert_embeddings_export_as_int8_tables(tmp_path):
    batches = [bert_inputs(2, 8) for _ in range(4)]
    model = _calibrated(tiny_bert(), batches[0], batches[:2])
    result = export_onnx(model, batches[0], tmp_path / "bert.onnx")
    dtypes = _weight_dtypes(result.path)
    assert [n for n in dtypes if "word_embeddings" in n], dtypes
    assert set(dtypes.values()) == {TensorProto.INT8}, dtypes
    graph = onnx.load(str(result.path)).graph
    producers = {out: n.op_type for n in graph.node for out in n.output}
    gathers = [
        n for n in graph.node if n.op_type == "Gather" and producers.get(n.input[0]) == "DequantizeLinear"
    ]
    assert len(gathers) >= 2  # word and token-type lookups read a dequantized int8 table
    check = check_export(model, result.path, batches[2:], out_dir=tmp_path)
    assert check.passed, check


def test_cloned_layers_store_their_int8_weights_once(tmp_path):
    """Identical integer weights are one initializer, as torch.onnx stores identical float weights once."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()  # the clones start equal
    xs = [torch.randn(3, 6, 32) for _ in range(3)]
    model = _calibrated(encoder, (xs[0],), xs[:2])
    for name, node in ql.iter_fake_quantize(model):  # equal scales on the two layers' weights
        if name.startswith("layers.1.") and name.endswith("weight_quant"):
            node.scale.copy_(dict(ql.iter_fake_quantize(model))["layers.0." + name[len("layers.1.") :]].scale)
    result = export_onnx(model, (xs[0],), tmp_path / "enc.onnx")
    graph = onnx.load(str(result.path)).graph
    big = [i for i in graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2]
    assert len(big) == 6  # q, k, v, out, linear1, linear2 of one layer: the second layer reads the same
    dq_inputs = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert all(dq_inputs.count(i.name) == 2 for i in big)
    assert check_export(model, result.path, xs[2:], out_dir=tmp_path).passed
