"""fx prepare never quantizes a mask-like value: an attention mask from a *float* ``attention_mask``, or
one built from ``-inf`` / ``finfo.min`` / large constants, is added in float32 like the integer-mask one
(an int8 output point on ``scores + mask`` got a scale of ~1e36 and rounded every score to 0)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant import iter_quant_ops
from tests.models import tiny_bert_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")

_SOFTMAX = "bert.encoder.layer.0.attention.self.softmax"
_ADD = "bert.encoder.layer.0.attention.self.add"


def _bert() -> nn.Module:
    model = tiny_bert_classifier("eager")
    with torch.no_grad():  # peaky attention, as in a trained model
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(6)
            layer.attention.self.key.weight.mul_(6)
    return model


def _batches(mask_dtype: torch.dtype, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (4, 16), generator=g)
        mask = torch.ones(4, 16, dtype=torch.long)
        for row in range(4):
            mask[row, int(torch.randint(5, 17, (1,), generator=g)) :] = 0
        out.append({"input_ids": ids, "attention_mask": mask.to(mask_dtype)})
    return out


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64])
def test_bert_mask_add_stays_float_and_softmax_matches(mask_dtype):
    batches = _batches(mask_dtype)
    prepared = ql.prepare(_bert(), example_inputs=batches[0], method="fx")
    record = prepared.prepare_record
    floats = {op.name: op for op in record.float_ops}
    assert _ADD in floats and "mask-like" in floats[_ADD].reason
    assert _ADD not in prepared.quant_op_order
    assert any(_ADD in note and "mask-like" in note for note in record.notes)
    ql.calibrate(prepared, batches[:3])
    probs: dict[str, torch.Tensor] = {}
    prepared.get_submodule(_SOFTMAX).register_forward_hook(lambda m, i, o: probs.__setitem__("p", o))
    with torch.no_grad():
        prepared(**batches[3])
        fake = probs["p"]
        with ql.fake_quant_disabled(prepared):
            prepared(**batches[3])
    assert (fake - probs["p"]).abs().max() < 0.05


class _Scores(nn.Module):
    """``softmax(q(x) @ k(x)^T + mask)`` with the mask built in one of several mask-like ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.how = how
        self.register_buffer("causal", torch.full((6, 6), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1)
        if self.how == "where":
            mask = torch.where(keep[:, None, :].bool(), 0.0, torch.finfo(x.dtype).min)
        elif self.how == "masked_fill":
            inverted = 1.0 - keep[:, None, :]
            mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(x.dtype).min)
        elif self.how == "mul":
            mask = (1.0 - keep[:, None, :]) * -10000.0
        else:
            mask = self.causal[: x.shape[1], : x.shape[1]]
        return torch.softmax(scores + mask, dim=-1)


@pytest.mark.parametrize("how", ["where", "masked_fill", "mul", "buffer"])
def test_masks_built_from_a_float_input_or_large_constants_are_not_quantized(how):
    x = torch.randn(2, 6, 8)
    keep = torch.ones(2, 6)
    keep[0, 4:] = 0
    prepared = ql.prepare(_Scores(how).eval(), example_inputs=(x, keep), method="fx")
    assert "add" not in prepared.quant_op_order
    assert [op.name for op in prepared.prepare_record.float_ops] == ["add"]


class _Gates(nn.Module):
    """Bool-derived values that are not masks: ``where`` with small constants, masked activations."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        leaky = y * torch.where(y > 0, 1.0, 0.1)
        masked = y.masked_fill(y < -1, float("-inf"))
        return torch.softmax(masked, dim=-1) + leaky


def test_gates_and_masked_activations_stay_quantized():
    prepared = ql.prepare(_Gates().eval(), example_inputs=(torch.randn(2, 8),), method="fx")
    assert prepared.quant_op_order == ["x_quant", "lin", "mul", "softmax", "add"]
    assert [op.name for op in prepared.prepare_record.float_ops] == ["where"]  # no quantized where
    assert dict(iter_quant_ops(prepared))["softmax"].op_info.input_producers == (None,)
