"""nn.Embedding quantized per row (weight only, torch.ao's way; the output point follows the qconfig)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_lightning.quant import QConfig, check_model, prepare, set_fake_quantize
from qat_lightning.quant.nodes.embedding import QatEmbedding
from qat_lightning.quant.preparation.model_check import float_input_gemms

pytestmark = pytest.mark.usefixtures("one_thread")


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16, padding_idx=0)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def _per_row_reference(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.reshape(-1, 1)
    return torch.clamp(torch.round(weight / s), -128, 127) * s


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_embedding_weight_is_quantized_per_row(method):
    torch.manual_seed(0)
    model, ids = _Lookup().eval(), torch.randint(0, 100, (2, 7))
    prepared = prepare(model, ids, method=method, qconfig_setter=QConfig(output_dtype=None))
    op = prepared.get_submodule("emb")
    assert isinstance(op, QatEmbedding) and op.op_info.op_type == "Embedding"
    assert len(op.input_quant) == 0  # integer indices: no input quant point
    wq = op.weight_quant
    assert wq.dtype.name == "qint8" and wq.ch_axis == 0 and wq.scale.numel() == 100
    set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        prepared(ids)
    set_fake_quantize(prepared, "validation")
    weight = model.emb.weight.detach()
    scale = wq.scale.detach()
    torch.testing.assert_close(scale[1:], weight[1:].abs().amax(dim=1) / 127, rtol=1e-5, atol=0)
    assert 0 < float(scale[0]) < 1e-6  # the all-zero padding row gets the observer's smallest scale
    want = _per_row_reference(weight, scale)[ids]  # output_dtype=None: the dequantized rows themselves
    with torch.no_grad():
        got = op(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # weight-only rows are not one int8 tensor: the linear they feed is honestly a float32-input gemm
    assert [i.name for i in float_input_gemms(prepared)] == ["fc"]


def test_embedding_in_model_check_is_int8_with_default_output_point():
    model, ids = _Lookup().eval(), torch.randint(0, 100, (2, 7))
    prepared = prepare(model, ids, method="fx")
    op = prepared.get_submodule("emb")
    assert op.output_quant is not None and op.output_quant.dtype.name == "qint8"
    report = check_model(prepared)
    (row,) = [r for r in report.weight_qconfigs if r.name == "emb"]
    assert (row.weight_dtype, row.ch_axis) == ("qint8", "0")
    assert "Not quantized (float32): 0 op(s)" in report.to_text()
    int8 = next(r for r in report.dtype_summary if r.dtype == "qint8")
    assert int8.ops == 2  # emb (compute dtype: its weight's) and fc; the integer ids get no point


def test_embedding_weight_is_a_sensitivity_target():
    from qat_lightning.analysis.sensitivity.exact import sensitivity_targets

    prepared = prepare(_Lookup().eval(), torch.randint(0, 100, (2, 7)), method="eager")
    rows = {(t.op_name, t.sensitive_type, t.op_type) for t in sensitivity_targets(prepared)}
    assert ("emb", "weight", "Embedding") in rows and ("emb", "activation", "Embedding") in rows
