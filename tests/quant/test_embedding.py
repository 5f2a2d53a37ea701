"""nn.Embedding quantized per row (weight only, torch.ao's way; the output point follows the qconfig)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat_lightning.quant import QConfig, check_model, prepare, set_fake_quantize
from qat_lightning.quant.backends import set_backend
from qat_lightning.quant.backends.cpu_kernels import kernels_available
from qat_lightning.quant.nodes.embedding import QatEmbedding
from qat_lightning.quant.nodes.functional import quantize_tensor
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


# ------------------------------------------------------------------------------------- max_norm, sparse
class _Table(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def _max_norm_model() -> _Table:
    """Rows of norm 0.4 .. 3.0 under ``max_norm=1``: about two thirds of them get renormalised."""
    torch.manual_seed(0)
    model = _Table(max_norm=1.0).eval()
    with torch.no_grad():
        w = model.emb.weight
        w.mul_(torch.linspace(0.4, 3.0, 50)[:, None] / w.norm(dim=1, keepdim=True))
    return model


def _calibrated(model: nn.Module, ids: torch.Tensor, method: str, **qconfig) -> nn.Module:
    prepared = prepare(model, ids, method=method, qconfig_setter=QConfig(**qconfig))
    set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        prepared(ids)
    return prepared


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_max_norm_validation_rows_lie_on_the_grid_of_the_renormalised_weight(method):
    model, ids = _max_norm_model(), torch.arange(50)[None]
    prepared = _calibrated(model, ids[:, :25], method, output_dtype=None)  # rows 25.. not renormalised yet
    set_fake_quantize(prepared, "validation")
    op = prepared.get_submodule("emb")
    with torch.no_grad():
        out = prepared(ids)[0].double()
    weight, scale = op.module.weight.detach().double(), op.weight_quant.scale.detach().double()[:, None]
    codes = out / scale
    assert float((codes - codes.round()).abs().max()) < 1e-4  # on the per-row int8 grid (float32 products)
    assert float(weight.norm(dim=1).max()) <= 1.0 + 1e-6  # the real table was renormalised first
    want = torch.clamp(torch.round(weight / scale), -128, 127) * scale
    torch.testing.assert_close(out, want, rtol=0, atol=1e-7)


def test_max_norm_qat_forward_and_backward_give_the_float_gradient():
    model, ids = _max_norm_model(), torch.randint(0, 50, (3, 9))
    prepared = _calibrated(model, ids[:1], "eager", output_dtype=None).train()
    op = prepared.get_submodule("emb")
    reference = copy.deepcopy(op.module)
    set_fake_quantize(prepared, "qat")
    out = prepared(ids)
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward()
    (reference(ids) * upstream).sum().backward()
    assert torch.equal(op.module.weight, reference.weight)
    torch.testing.assert_close(op.module.weight.grad, reference.weight.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("state", ["float", "calibration", "qat", "validation"])
@pytest.mark.parametrize("method", ["fx", "eager"])
def test_max_norm_renormalises_the_weight_as_the_float_embedding(method, state):
    model, ids = _max_norm_model(), torch.randint(0, 50, (2, 11))
    prepared = _calibrated(model, ids[:, :3], method)
    op = prepared.get_submodule("emb")
    reference = copy.deepcopy(op.module)
    assert torch.equal(op.module.weight, reference.weight)
    set_fake_quantize(prepared, state)
    prepared.train(state == "qat")
    out = prepared(ids)
    want = reference(ids)
    assert float(reference.weight.norm(dim=1)[ids].max()) <= 1.0 + 1e-6
    assert torch.equal(op.module.weight, reference.weight)
    if state == "float":
        assert torch.equal(out, want)


def _sparse_grads(state: str, output_dtype: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight gradients of a prepared sparse embedding and of the same one dense, after a weight change."""
    grads = []
    ids = torch.tensor([[1, 0, 3, 3], [5, 0, 7, 1]])
    upstream = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    for sparse in (True, False):
        torch.manual_seed(0)
        model = _Table(padding_idx=0, sparse=sparse)
        prepared = _calibrated(model, ids, "fx", output_dtype=output_dtype).train()
        op = prepared.get_submodule("emb")
        with torch.no_grad():
            op.module.weight[1].mul_(1.5)  # after calibration: part of row 1 is clipped in VALIDATION
        set_fake_quantize(prepared, state)
        (prepared(ids) * upstream).sum().backward()
        grads.append(op.module.weight.grad)
    return grads[0], grads[1]


@pytest.mark.parametrize("state", ["validation", "qat"])
@pytest.mark.parametrize("output_dtype", [None, "qint8"])
def test_sparse_embedding_gradient_equals_the_dense_one(state, output_dtype, backend):
    sparse, dense = _sparse_grads(state, output_dtype)
    assert sparse.is_sparse and not dense.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=0, atol=0)
    if state == "validation":  # the straight-through rule really cut something off
        assert bool((dense[1] == 0).any()) and bool((dense[1] != 0).any())


@pytest.fixture(params=["default", "cpu_kernels"])
def backend(request):
    """Each backend in turn (the C kernels' backward masks a sparse gradient by its bit / byte mask)."""
    if request.param == "cpu_kernels" and not kernels_available():
        pytest.skip("the C kernels were not built")
    set_backend(request.param)
    yield request.param
    set_backend("default")


@pytest.mark.parametrize("ch_axis", [None, 0])
def test_sparse_gradient_is_masked_at_its_indices_and_stays_sparse(ch_axis, backend) -> None:
    """``F.embedding(sparse=True)`` hands a sparse COO gradient to the table's node: same values as dense."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 6, generator=g) * 2
    table[3, 1] = float("nan")  # a NaN input gets no gradient, sparse or dense
    table[3, 4] = 10.0  # clipped at every scale here
    scale = torch.tensor(0.01) if ch_axis is None else torch.rand(12, generator=g) * 0.02 + 0.005
    ids = torch.tensor([[1, 0, 3, 3], [5, 0, 7, 1]])
    upstream = torch.randn(2, 4, 6, generator=g)
    upstream[0, 2, 4] = float("nan")  # a NaN arriving at a clipped element gives 0 there
    grads = []
    for sparse in (True, False):
        w = table.clone().requires_grad_()
        out = torch.nn.functional.embedding(ids, quantize_tensor(w, scale, -128, 127, ch_axis), sparse=sparse)
        (out * upstream).sum().backward()
        grads.append(w.grad)
    sparse_grad, dense_grad = grads
    assert sparse_grad.is_sparse and sparse_grad.shape == table.shape
    assert float(dense_grad[3, 4]) == 0.0 and float(dense_grad[3, 1]) == 0.0
    torch.testing.assert_close(sparse_grad.to_dense(), dense_grad, rtol=0, atol=0, equal_nan=True)
    looked_up = dense_grad[ids.unique()]
    assert bool((looked_up == 0).any()) and bool((looked_up != 0).any())  # the rule cut some off
