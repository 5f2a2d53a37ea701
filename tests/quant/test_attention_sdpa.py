"""fx prepare turns ``F.scaled_dot_product_attention`` into the eager attention's ops: the scale ``mul``
with its own quant point and the mask ``add`` as a recorded float32 op, so the report, the dtype shares
and the chip rules see what runs (the scale and mask used to run unlisted between matmul and softmax)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant import iter_quant_ops
from qat_lightning.quant.ops import OpKind
from tests.models import j6p_gemm_int8_setter, tiny_bert_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")

_SELF = "bert.encoder.layer.0.attention.self."


def _bert(impl: str) -> nn.Module:
    return tiny_bert_classifier(impl)


def _inputs() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(0, 200, (2, 8)), "attention_mask": mask}


def _ops(prepared: nn.Module) -> list[tuple[str, str, tuple, int]]:
    return [
        (n, o.op_info.op_type, o.op_info.input_producers, o.op_info.flops)
        for n, o in iter_quant_ops(prepared)
    ]


def test_sdpa_bert_has_the_eager_attention_ops():
    inputs = _inputs()
    eager = ql.prepare(_bert("eager"), example_inputs=inputs, method="fx")
    sdpa = ql.prepare(_bert("sdpa"), example_inputs=inputs, method="fx")
    assert _ops(sdpa) == _ops(eager)
    ops = dict(iter_quant_ops(sdpa))
    assert ops[_SELF + "mul"].op_info.input_producers == (_SELF + "matmul",)
    assert ops[_SELF + "mul"].output_quant.dtype == ql.qint8  # its own quant point
    assert ops[_SELF + "softmax"].op_info.input_producers == (None,)  # reads the float masked scores
    floats = [(op.name, op.op_type, op.flops, op.reason) for op in sdpa.prepare_record.float_ops]
    assert floats == [(op.name, op.op_type, op.flops, op.reason) for op in eager.prepare_record.float_ops]
    assert (_SELF + "add", "add") in [f[:2] for f in floats]
    ql.set_fake_quantize(sdpa, "float")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**inputs).logits, _bert("sdpa")(**inputs).logits)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_j6p_refuses_the_float32_mask_add_whatever_the_attention(impl):
    setter = j6p_gemm_int8_setter()
    with pytest.raises(
        ValueError, match=r"(?s)j6p cannot run these float32 ops.*layer.0.attention.self.add \(add"
    ):
        ql.prepare(_bert(impl), example_inputs=_inputs(), method="fx", qconfig_setter=setter)


class _Sdpa(nn.Module):
    def __init__(self, mask: str) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Linear(6, 6)
        self.mask = mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = self.bias(mask) if self.mask == "learned" else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=0.3)


@pytest.mark.parametrize("kind", ["additive", "learned"])
def test_plain_sdpa_scale_and_mask_ops(kind):
    x = torch.randn(2, 6, 8)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., -1] = float("-inf") if kind == "additive" else 1.0
    model = _Sdpa("learned" if kind == "learned" else "input").eval()
    prepared = ql.prepare(model, (x, mask), method="fx")
    ops = dict(iter_quant_ops(prepared))
    assert ops["mul"].op_info.input_producers == ("matmul",)
    if kind == "additive":  # an input holding -inf: a mask, float32, softmax reads it
        assert [op.name for op in prepared.prepare_record.float_ops] == ["add"]
        assert ops["softmax"].op_info.input_producers == (None,)
        assert "mask_quant" not in ops
    else:  # a learned bias is an activation: a quantized add, as eager code would get
        assert ops["add"].op_info.input_producers == ("mul", "bias")
        assert ops["softmax"].op_info.input_producers == ("add",)
        assert prepared.prepare_record.float_ops == ()
    ql.set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)


class _SdpaTrainDropout(nn.Module):
    """Attention as HuggingFace / torch write it: ``dropout_p`` only in train mode; optional GQA."""

    def __init__(self, kv_heads: int = 2, dropout: str = "train") -> None:
        super().__init__()
        self.kv_heads, self.dropout = kv_heads, dropout
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 8 * kv_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, 4).permute(2, 0, 3, 1, 4).unbind(0)
        p = 0.5 if self.training else 0.0
        if self.dropout == "runtime":  # computed in forward: a graph node, not a constant
            p = x.size(0) * 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=self.kv_heads != 4)


def _calibrated_validation(prepared: nn.Module, x: torch.Tensor) -> None:
    ql.set_fake_quantize(prepared, "calibration")
    prepared(x)
    ql.set_fake_quantize(prepared, "validation")


def test_sdpa_dropout_of_a_train_mode_trace_is_a_dropout_module_and_quantized():
    """Traced in train mode (as Lightning's setup runs): the attention is decomposed and quantized, and its
    dropout follows ``eval()`` (it was one float op with output quant only, dropping weights in eval)."""
    x = torch.randn(2, 6, 16)
    model = _SdpaTrainDropout(kv_heads=4).train()
    prepared = ql.prepare(model, x, method="fx")
    ops = dict(iter_quant_ops(prepared))
    assert {"matmul", "mul", "softmax", "matmul_1"} <= set(ops) and prepared.prepare_record.float_ops == ()
    assert (
        ops["matmul_1"].op_info.kind is OpKind.GEMM
        and ops["matmul_1"].op_info.input_producers[0] == "softmax"
    )
    assert isinstance(prepared.get_submodule("dropout"), nn.Dropout) and prepared.dropout.p == 0.5
    prepared.eval()
    _calibrated_validation(prepared, x)
    with torch.no_grad():
        assert torch.equal(prepared(x), prepared(x))  # no dropout in eval
        ql.set_fake_quantize(prepared, "float")
        torch.testing.assert_close(prepared(x), model.eval()(x), rtol=1e-5, atol=1e-6)
        prepared.train()
        assert not torch.equal(prepared(x), prepared(x))  # train mode: the attention weights dropped


def test_sdpa_gqa_repeats_the_key_and_value_heads():
    x = torch.randn(2, 6, 16)
    model = _SdpaTrainDropout(kv_heads=2).eval()
    prepared = ql.prepare(model, x, method="fx")
    ops = dict(iter_quant_ops(prepared))
    assert ops["matmul"].op_info.flops == 2 * 4 * 6 * 6 * 4 and prepared.prepare_record.float_ops == ()
    ql.set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)


def test_sdpa_with_a_dropout_computed_in_forward_is_reported_float():
    x = torch.randn(2, 6, 16)
    model = _SdpaTrainDropout(kv_heads=4, dropout="runtime").eval()
    prepared = ql.prepare(model, x, method="fx")
    (op,) = prepared.prepare_record.float_ops
    assert op.op_type == "scaled_dot_product_attention" and op.flops == 2 * (2 * 4 * 6 * 6 * 4)
    assert not any("matmul" in name or "scaled_dot" in name for name, _ in iter_quant_ops(prepared))
    ql.set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)
