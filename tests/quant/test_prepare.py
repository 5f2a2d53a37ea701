"""prepare(): model families through fx/auto/eager, op names, FLOAT equivalence, calibration, bad input."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, iter_fake_quantize, set_fake_quantize
from qat_lightning.quant.ops import OpKind, PrepareRecord, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.preparation.fx_tracer import FxTraceError
from qat_lightning.quant.preparation.prepare import prepare
from qat_lightning.quant.qconfig.qconfig import get_qconfig
from tests.models import (
    CheckModel,
    DataDependentModel,
    TinyEncoder,
    TinyResNet,
    bert_inputs,
    tiny_bert,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add barrier waits


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))


def _calibrate(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> None:
    set_fake_quantize(model, "calibration")
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    set_fake_quantize(model, "validation")


def _prepare_quiet(*args, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("method", ["fx", "auto"])
def test_resnet_fx_fuses_and_names(method, seed):
    model = TinyResNet().eval()
    x = TinyResNet.example_inputs()
    prepared = prepare(model, x, method=method)
    record = prepared.prepare_record
    assert isinstance(record, PrepareRecord) and record.method == "fx"
    assert prepared.quant_op_order == [
        "x_quant", "conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.downsample.0",
        "layer2.0.conv1", "layer2.0.conv2", "avgpool", "fc",
    ]  # fmt: skip
    assert ("layer1.0.conv2", "layer1.0.bn2", "layer1.0.add", "layer1.0.relu#1") in record.fused
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in record.fused
    ops = dict(iter_quant_ops(prepared))
    assert ops["layer1.0.conv2"].op_info.op_type == "ConvBnAddReLU2d"
    assert ops["conv1"].op_info.op_type == "ConvBnReLU2d"
    assert ops["layer2.0.downsample.0"].op_info.op_type == "ConvBn2d"
    # the residual add: conv input + residual input, both producers named
    assert ops["layer1.0.conv2"].op_info.input_producers == ("layer1.0.conv1", "maxpool")
    assert len(ops["layer1.0.conv2"].input_quant) == 2
    assert ops["x_quant"].op_info.kind == OpKind.INPUT
    # FLOPs: conv1 = out numel (2*8*16*16) * in_ch 3 * 3x3
    assert ops["conv1"].op_info.flops == 2 * 8 * 16 * 16 * 3 * 9
    assert ops["fc"].op_info.flops == 2 * 10 * 16
    assert dict(record.call_counts)["layer1.0.relu"] == 2


def test_quant_node_names_and_kinds(seed):
    prepared = prepare(TinyResNet().eval(), TinyResNet.example_inputs(), method="fx")
    for name, op in iter_quant_ops(prepared):
        nodes = quant_nodes_of(op)
        assert nodes["output"].name == f"{name}.output"
        if op.op_info.kind == OpKind.GEMM:
            assert nodes["weight"].name == f"{name}.weight" and nodes["weight"].ch_axis == 0
            assert nodes["input.0"].name == f"{name}.input.0"
            assert str(nodes["input.0"].dtype) == "float32"  # default qconfig: inputs as produced
            assert str(nodes["weight"].dtype) == "qint8"
        assert str(nodes["output"].dtype) == "qint8"


def test_encoder_functional_ops_named_by_parent(seed):
    model = TinyEncoder().eval()
    x = TinyEncoder.example_inputs()
    prepared = prepare(model, x, method="auto")
    assert prepared.prepare_record.method == "fx"
    order = prepared.quant_op_order
    for name in ["layers.0.attn.matmul", "layers.0.attn.softmax", "layers.0.attn.matmul_1", "layers.0.add",
                 "layers.0.add_1", "layers.1.act", "layers.1.attn.mul", "norm"]:  # fmt: skip
        assert name in order
    ops = dict(iter_quant_ops(prepared))
    mm = ops["layers.0.attn.matmul_1"].op_info
    assert (
        mm.kind == OpKind.GEMM
        and mm.is_matmul
        and mm.input_producers == ("layers.0.attn.softmax", "layers.0.attn.v")
    )
    assert (
        len(ops["layers.0.attn.matmul"].input_quant) == 2 and ops["layers.0.attn.matmul"].weight_quant is None
    )
    assert ops["layers.0.attn.matmul"].op_info.input_producers == ("layers.0.attn.q", "layers.0.attn.k")
    assert mm.flops == 2 * 2 * 8 * 8 * 8  # (batch, heads, seq, head_dim) @ (.., seq, head_dim)
    assert ops["layers.0.add"].op_info.kind == OpKind.OTHER
    set_fake_quantize(prepared, "float")
    assert _rel_err(prepared(*x), model(*x)) < 1e-5


def test_bert_through_auto(seed):
    model = tiny_bert()
    inputs = bert_inputs()
    prepared = prepare(model, inputs)
    assert prepared.prepare_record.method == "fx"
    order = prepared.quant_op_order
    assert "encoder.layer.0.attention.self.matmul" in order
    assert "encoder.layer.1.attention.self.softmax" in order
    assert "encoder.layer.0.attention.output.add" in order
    assert "embeddings.add" in order and "pooler.dense" in order
    set_fake_quantize(prepared, "float")
    for batch in (inputs, {"input_ids": torch.randint(0, 100, (3, 5))}):  # other batch / sequence length
        out, ref = prepared(**batch), model(**batch)
        assert type(out) is type(ref)
        assert _rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
    _calibrate(prepared, [(inputs["input_ids"],)])
    out = prepared(**inputs).last_hidden_state
    ref = model(**inputs).last_hidden_state
    assert 0 < _rel_err(out, ref) < 0.5
    buffer = io.BytesIO()
    torch.save(prepared, buffer)  # the reload re-traces the generated code (buffers sliced by shapes)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(**inputs).last_hidden_state, out)
    eager = prepare(model, inputs, method="eager")  # keyword inputs through the eager pre-hook
    assert eager.quant_op_order[
        0
    ] == "embeddings.word_embeddings" or "encoder.layer.0.attention.self.query" in (eager.quant_op_order)
    set_fake_quantize(eager, "float")
    assert _rel_err(eager(**inputs).last_hidden_state, ref) < 1e-5


def test_bert_with_attention_mask(seed):
    model = tiny_bert()
    inputs = bert_inputs()
    inputs["attention_mask"] = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    prepared = prepare(model, inputs, method="fx")
    set_fake_quantize(prepared, "float")
    assert _rel_err(prepared(**inputs).last_hidden_state, model(**inputs).last_hidden_state) < 1e-5


def test_data_dependent_model_falls_back_to_eager(seed):
    model = DataDependentModel().eval()
    x = DataDependentModel.example_inputs()
    with pytest.warns(UserWarning, match="fell back to eager") as rec:
        prepared = prepare(model, x, method="auto")
    message = str(rec[0].message)
    assert "x.sum() > 0" in message and "mul (mul)" in message
    record = prepared.prepare_record
    assert record.method == "eager"
    assert "mul (mul)" in record.not_covered
    assert prepared.quant_op_order == ["x_quant", "conv", "pos", "act"]
    assert dict(record.call_counts) == {"conv": 1, "pos": 1, "neg": 0, "act": 1}
    set_fake_quantize(prepared, "float")
    assert torch.equal(prepared(*x), model(*x))
    x_neg = (-x[0],)
    assert torch.equal(prepared(*x_neg), model(*x_neg))  # both branches still work


def test_untraceable_with_fx_names_line_and_suggests(seed):
    with pytest.raises(FxTraceError) as info:
        prepare(DataDependentModel(), DataDependentModel.example_inputs(), method="fx")
    message = str(info.value)
    assert "models.py" in message and "x.sum() > 0" in message
    assert "eager" in message and "auto" in message


def test_eager_mode_swaps_modules(seed):
    model = TinyResNet().eval()
    x = TinyResNet.example_inputs()
    prepared = prepare(model, x, method="eager")
    record = prepared.prepare_record
    assert record.method == "eager" and record.fused == ()
    assert ("conv1", "bn1", "relu") in record.unfused
    assert "layer1.0.add (add)" in record.not_covered
    assert "layer1.0.relu#1" in prepared.quant_op_order  # relu is called twice per block
    assert isinstance(prepared.get_submodule("layer1.0.relu#1"), nn.Module)
    set_fake_quantize(prepared, "float")
    assert torch.equal(prepared(*x), model(*x))


# ---------------------------------------------------------------------------------------------- shared module
@pytest.mark.parametrize("method", ["fx", "eager"])
def test_shared_module_gets_per_call_site_nodes(method, seed):
    model = CheckModel().eval()
    x = CheckModel.example_inputs()
    prepared = prepare(model, x, method=method)
    assert prepared.quant_op_order == ["quant", "conv", "conv#1", "relu"]
    ops = dict(iter_quant_ops(prepared))
    first, second = ops["conv"], ops["conv#1"]
    assert second.op_info.call_index == 1 and second.op_info.module_path == "conv"
    assert first.weight_quant is second.weight_quant
    assert first.module.weight is second.module.weight
    assert first.output_quant is not second.output_quant
    assert first.input_quant[0] is not second.input_quant[0]
    assert ops["quant"].op_info.kind == OpKind.INPUT
    assert dict(prepared.prepare_record.call_counts)["conv"] == 2
    assert ("conv#1", "relu") in prepared.prepare_record.unfused
    _calibrate(prepared, [x])
    # each call site saw its own data: different scales
    assert float(first.output_quant.scale) != pytest.approx(float(second.output_quant.scale))
    out = prepared(*x)
    assert 0 < _rel_err(out, model(*x)) < 0.2


def test_fixed_scale_quant_stub_via_setter(seed):
    from qat_lightning.quant.qconfig.setter import QconfigSetter
    from qat_lightning.quant.qconfig.templates import ModuleNameTemplate

    setter = QconfigSetter(templates=[ModuleNameTemplate({"quant": {"threshold": 200.0}})])
    prepared = prepare(CheckModel().eval(), CheckModel.example_inputs(), qconfig_setter=setter)
    node = prepared.get_submodule("quant").output_quant
    assert node.is_fixed
    assert float(node.scale) == pytest.approx(200.0 / 127)


def test_check_dir_writes_report(tmp_path, seed):
    prepare(CheckModel().eval(), CheckModel.example_inputs(), check_dir=tmp_path)
    text = (tmp_path / "model_check_result.txt").read_text()
    assert "conv#1" in text and "quant" in text
    assert not (tmp_path / "qconfig_changelog.txt").exists()


def test_unmatched_template_names_warn(seed):
    from qat_lightning.quant.qconfig.setter import QconfigSetter
    from qat_lightning.quant.qconfig.templates import ModuleNameTemplate

    setter = QconfigSetter(templates=[ModuleNameTemplate({"no_such_layer": "qint16"})])
    with pytest.warns(UserWarning, match="no_such_layer"):
        prepare(CheckModel().eval(), CheckModel.example_inputs(), qconfig_setter=setter)


# ---------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("family", ["resnet", "encoder", "datadep"])
def test_float_state_equivalence_and_calibration(family, seed):
    cls = {"resnet": TinyResNet, "encoder": TinyEncoder, "datadep": DataDependentModel}[family]
    model = cls().eval()
    x = cls.example_inputs()
    prepared = _prepare_quiet(model, x, method="auto")
    set_fake_quantize(prepared, "float")
    ref = model(*x)
    assert _rel_err(prepared(*x), ref) < 1e-5
    _calibrate(prepared, [cls.example_inputs() for _ in range(3)] + [x])
    out = prepared(*x)
    assert 0 < _rel_err(out, ref) < 0.5
    for name, node in iter_fake_quantize(prepared):
        assert torch.isfinite(node.scale).all(), name
        if node.dtype.is_integer:
            assert (node.scale > 0).all(), name


def test_qat_state_trains(seed):
    model = TinyResNet().train()
    x = TinyResNet.example_inputs(4)
    prepared = prepare(model, x)
    _calibrate(prepared, [x])
    set_fake_quantize(prepared, "qat")
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    loss = prepared(*x).square().mean()
    loss.backward()
    grads = [p.grad for p in prepared.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()


# ---------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("method", ["fx", "eager"])
def test_deepcopy_state_dict_roundtrip_and_pickle(method, seed):
    model = TinyResNet().eval()
    x = TinyResNet.example_inputs()
    prepared = prepare(model, x, method=method)
    _calibrate(prepared, [x])
    expected = prepared(*x)
    clone = copy.deepcopy(prepared)
    assert clone.quant_op_order == prepared.quant_op_order
    assert clone.prepare_record == prepared.prepare_record
    assert torch.equal(clone(*x), expected)
    fresh = prepare(model, x, method=method)
    fresh.load_state_dict(prepared.state_dict())
    set_fake_quantize(fresh, "validation")
    assert torch.equal(fresh(*x), expected)
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.quant_op_order == prepared.quant_op_order
    assert torch.equal(loaded(*x), expected)
    assert isinstance(pickle.loads(pickle.dumps(prepared)), nn.Module)


def test_user_model_untouched(seed):
    model = TinyResNet().train()
    before = copy.deepcopy(model.state_dict())
    prepare(model, TinyResNet.example_inputs(), qat_mode="freeze_bn")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_method_and_mode():
    with pytest.raises(ValueError, match="fx, eager, auto"):
        prepare(TinyResNet(), TinyResNet.example_inputs(), method="jit")
    with pytest.raises(ValueError, match="fuse_bn, with_bn, freeze_bn"):
        prepare(TinyResNet(), TinyResNet.example_inputs(), qat_mode="bn")


def test_prepared_model_is_rejected(seed):
    prepared = prepare(TinyEncoder().eval(), TinyEncoder.example_inputs())
    with pytest.raises(ValueError, match="already prepared"):
        prepare(prepared, TinyEncoder.example_inputs())


def test_example_inputs_that_crash_the_model():
    with pytest.raises(ValueError, match="fails on example_inputs") as info:
        prepare(TinyResNet(), (torch.randn(2, 5, 16, 16),))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_single_tensor_and_bad_example_inputs(seed):
    prepared = prepare(TinyEncoder().eval(), torch.randn(2, 8, 16))
    assert prepared.quant_op_order[0] == "x_quant"
    with pytest.raises(TypeError, match="example_inputs"):
        prepare(TinyEncoder(), 3.0)


def test_qconfig_applies_to_nodes(seed):
    qconfig = get_qconfig(in_dtype="qint16", weight_dtype="qint8", out_dtype="qint16")
    prepared = prepare(TinyEncoder().eval(), TinyEncoder.example_inputs(), qconfig_setter=qconfig)
    ops = dict(iter_quant_ops(prepared))
    assert str(ops["layers.0.attn.q"].input_quant[0].dtype) == "qint16"
    assert str(ops["layers.0.attn.matmul"].input_quant[1].dtype) == "qint16"
    assert str(ops["norm"].output_quant.dtype) == "qint16"
