"""nn.MultiheadAttention decomposed at prepare: same function (float64), named quant ops on fx and eager,
no fused transformer fast path, and what cannot be quantized reported as float32."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from qat_lightning.quant import check_model, prepare, set_fake_quantize
from qat_lightning.quant.nodes.attention import DecomposedMultiheadAttention, MatMul
from qat_lightning.quant.preparation.attention_swap import decompose_attention
from qat_lightning.quant.preparation.model_check import float_input_gemms, not_quantized_share

pytestmark = pytest.mark.usefixtures("one_thread")

_ATTN_OPS = ("q_proj", "k_proj", "v_proj", "qk_matmul", "softmax", "av_matmul", "out_proj")
N, L, S, E, H = 3, 5, 6, 16, 4


def _inputs(batch_first: bool, kdim: int, vdim: int) -> tuple[torch.Tensor, ...]:
    def make(length: int, dim: int) -> torch.Tensor:
        shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(*shape, dtype=torch.float64)

    return make(L, E), make(S, kdim), make(S, vdim)


def _masks() -> list[dict[str, torch.Tensor]]:
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    per_head = torch.rand(N * H, L, S) > 0.7
    per_head[..., 0] = False
    return [
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": torch.randn(L, S, dtype=torch.float64)},
        {"attn_mask": per_head, "key_padding_mask": kpm},
        {"key_padding_mask": kpm.double() * -1e4, "attn_mask": torch.rand(L, S) > 0.8},
    ]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize(("batch_first", "kv_dims"), list(itertools.product([True, False], [False, True])))
def test_decomposed_attention_equals_torch_in_float64(batch_first, kv_dims):
    torch.manual_seed(0)
    kdim, vdim = (8, 12) if kv_dims else (E, E)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim).double().eval()
    dec = DecomposedMultiheadAttention.from_float(mha)
    q, k, v = _inputs(batch_first, kdim, vdim)
    for masks, need, avg in itertools.product(_masks(), [True, False], [True, False]):
        want = mha(q, k, v, need_weights=need, average_attn_weights=avg, **masks)
        got = dec(q, k, v, need_weights=need, average_attn_weights=avg, **masks)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)


def test_decomposed_attention_unbatched_and_causal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H).double().eval()
    dec = DecomposedMultiheadAttention.from_float(mha)
    x = torch.randn(L, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    for need in (True, False):
        want = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=need)
        got = dec(x, x, x, attn_mask=causal, is_causal=True, need_weights=need)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="is_causal"):
        dec(x, x, x, is_causal=True)


def test_from_float_copies_weights_and_refuses_bias_kv():
    mha = nn.MultiheadAttention(E, H, bias=False)
    dec = DecomposedMultiheadAttention.from_float(mha)
    assert dec.q_proj.bias is None and dec.out_proj.bias is None
    torch.testing.assert_close(dec.k_proj.weight, mha.in_proj_weight[E : 2 * E])
    assert dec.k_proj.weight.data_ptr() != mha.in_proj_weight.data_ptr()  # mha left unchanged
    with pytest.raises(ValueError, match="add_bias_kv"):
        DecomposedMultiheadAttention.from_float(nn.MultiheadAttention(E, H, add_bias_kv=True))


def test_shared_attention_is_swapped_once():
    mha = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": mha, "b": mha})
    assert decompose_attention(model) == []
    assert isinstance(model["a"], DecomposedMultiheadAttention) and model["a"] is model["b"]


def _encoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize(("method", "batch_first"), list(itertools.product(["fx", "eager"], [True, False])))
def test_transformer_encoder_attention_is_quantized(method, batch_first, monkeypatch):
    model = _encoder(batch_first)
    xs = [torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32) for _ in range(3)]
    prepared = prepare(model, xs[0], method=method).eval()
    for i in range(2):
        for op in _ATTN_OPS:
            assert f"layers.{i}.self_attn.{op}" in prepared.quant_op_order
    floats = prepared.prepare_record.float_ops
    assert not [op for op in floats if "self_attn" in op.name]
    assert not [i.name for i in float_input_gemms(prepared) if "self_attn" in i.name]  # producers found
    if method == "fx":  # eager cannot see the layer's functional residual adds (reported float32)
        assert floats == () and not_quantized_share(prepared) == (0, 0.0)
    matmul = prepared.get_submodule("layers.0.self_attn.qk_matmul")
    assert matmul.op_info.is_matmul and len(matmul.input_quant) == 2
    with torch.no_grad():
        want = model(xs[1])  # the float model itself takes the fused fast path

    # the fused encoder-layer kernel would bypass every quant point: the prepared model must not run it
    def fused(*args, **kwargs):
        raise AssertionError("torch._transformer_encoder_layer_fwd bypasses the quant points")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    set_fake_quantize(prepared, "float")
    with torch.no_grad():
        torch.testing.assert_close(prepared(xs[1]), want, rtol=1e-5, atol=1e-5)
        set_fake_quantize(prepared, "calibration")
        for x in xs:
            prepared(x)
    set_fake_quantize(prepared, "validation")
    softmax_scale = prepared.get_submodule("layers.1.self_attn.softmax").output_quant.scale
    assert 0 < float(softmax_scale) <= 1.01 / 127  # observed: softmax outputs lie in [0, 1]
    with torch.no_grad():
        got = prepared(xs[1])
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


class _MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return self.attn(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_float_mask_add_is_reported_as_float32(method):
    torch.manual_seed(0)
    model, x = _MaskedBlock().eval(), torch.randn(2, 5, E)
    causal = nn.Transformer.generate_square_subsequent_mask(5)  # float, -inf above the diagonal
    prepared = prepare(model, (x, causal), method=method)
    (op,) = prepared.prepare_record.float_ops
    assert op.name.startswith("attn.") and op.flops == 2 * H * 5 * 5
    assert not_quantized_share(prepared)[0] == 1
    assert "Not quantized (float32): 1 op(s)" in check_model(prepared).to_text()
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x, causal), model(x, causal), rtol=1e-5, atol=1e-5)


def test_bool_padding_mask_needs_no_float_op():
    torch.manual_seed(0)
    model, x = _MaskedBlock().eval(), torch.randn(2, 5, E)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, -2:] = True
    prepared = prepare(model, (x, kpm), method="fx")
    assert prepared.prepare_record.float_ops == ()
    set_fake_quantize(prepared, "float")
    torch.testing.assert_close(prepared(x, kpm), model(x, kpm), rtol=1e-5, atol=1e-5)


def test_attention_that_cannot_be_decomposed_is_reported_float32():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    prepared = prepare(Block().eval(), torch.randn(2, 5, E), method="fx")
    record = prepared.prepare_record
    assert [(op.op_type, op.flops) for op in record.float_ops] == [("MultiheadAttention", 2 * 5 * E)]
    assert any("add_bias_kv" in note for note in record.notes)
    assert "Not quantized (float32): 1 op(s)" in check_model(prepared).to_text()


def test_matmul_module_scale():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    torch.testing.assert_close(MatMul(0.5)(a, b), (a @ b) * 0.5)
    torch.testing.assert_close(MatMul()(a, b), a @ b)


def test_eager_reports_functional_sdpa_as_float32():
    class Sdpa(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(E, E)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.proj(x).unflatten(-1, (H, -1)).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    prepared = prepare(Sdpa().eval(), torch.randn(2, 5, E), method="eager")
    (op,) = prepared.prepare_record.float_ops
    assert (op.name, op.op_type) == ("scaled_dot_product_attention",) * 2
    assert op.flops == 2 * (2 * H * 5 * (E // H)) * 5  # q @ k^T and probs @ v


def test_attention_ops_are_sensitivity_targets():
    from qat_lightning.analysis.sensitivity.exact import sensitivity_targets

    prepared = prepare(_encoder(True), torch.randn(2, 5, 32), method="fx")
    rows = {(t.op_name, t.sensitive_type) for t in sensitivity_targets(prepared)}
    for op in ("qk_matmul", "softmax", "av_matmul"):
        assert (f"layers.0.self_attn.{op}", "activation") in rows
    for op in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert (f"layers.1.self_attn.{op}", "weight") in rows
