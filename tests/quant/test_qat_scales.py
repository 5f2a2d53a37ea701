"""QAT scale modes: set_qat_scales (moving / fixed / learned) and the LSQ gradient of lsq_quantize."""

from __future__ import annotations

import pytest
import torch

import qat_lightning as ql
from qat_lightning.quant.nodes import lsq_quantize


def calibrated(x: torch.Tensor) -> ql.FakeQuantize:
    fq = ql.FakeQuantize("qint8", "minmax")
    ql.set_fake_quantize(fq, "calibration")
    fq(x)
    ql.set_fake_quantize(fq, "qat")
    return fq


def test_lsq_scale_gradient_matches_a_finite_difference() -> None:
    """d/ds of the LSQ relaxation s * clamp(x/s + r, qmin, qmax), r = round(x/s0) - x/s0 held at s0."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(200, generator=gen, dtype=torch.float64) * 2).float()
    codes = torch.round(x.double() / 0.013)
    x = x[(codes != 127) & (codes != -128)]  # exactly on the clamp's kink a central difference averages
    assert bool((codes.abs() > 130).any())  # clipped values are in the test
    s0 = torch.tensor(0.013, requires_grad=True)
    factor = 0.37
    lsq_quantize(x, s0, -128, 127, factor).sum().backward()
    xd, sd = x.double(), torch.tensor(0.013, dtype=torch.float64)
    r = torch.round(xd * (1 / sd)) - xd / sd

    def relaxed(s: torch.Tensor) -> torch.Tensor:
        return (s * torch.clamp(xd / s + r, -128, 127)).sum()

    h = 1e-7
    fd = (relaxed(sd + h) - relaxed(sd - h)) / (2 * h)
    assert float(s0.grad) == pytest.approx(float(fd) * factor, rel=1e-4)


def test_lsq_value_and_input_gradient_equal_fake_quantize() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3
    s = torch.tensor(0.02)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = lsq_quantize(a, s.clone().requires_grad_(), -128, 127, 1.0)
    ref = ql.fake_quantize(b, s, "qint8")
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_modes_start_from_the_calibrated_scale_and_behave() -> None:
    gen = torch.Generator().manual_seed(2)
    fq = calibrated(torch.randn(100, generator=gen))
    calibrated_scale = fq.scale.clone()
    ql.set_qat_scales(fq, "fixed")
    fq(torch.randn(100, generator=gen) * 10)
    assert torch.equal(fq.scale, calibrated_scale) and fq.is_fixed
    ql.set_qat_scales(fq, "moving")
    fq(torch.randn(100, generator=gen) * 10)
    assert not torch.equal(fq.scale, calibrated_scale)
    fq2 = calibrated(torch.randn(100, generator=torch.Generator().manual_seed(2)))
    (param,) = ql.set_qat_scales(fq2, "learned")
    assert torch.equal(param.detach(), calibrated_scale) and param.dtype == torch.float32
    opt = torch.optim.SGD([param], lr=1e-3)
    fq2(torch.randn(100, generator=gen) * 3).square().sum().backward()
    opt.step()
    ql.set_fake_quantize(fq2, "validation")
    fq2(torch.zeros(3))
    assert torch.equal(fq2.scale, param.detach().abs())  # VALIDATION uses the learned value
    state = fq2.state_dict()
    fresh = ql.FakeQuantize("qint8", "minmax")
    fresh.load_state_dict(state)  # a learned-scale checkpoint restores its parameter
    assert fresh.scale_mode == "learned" and torch.equal(fresh.scale_param, param)


def test_unknown_mode_is_refused_before_any_change() -> None:
    fq = calibrated(torch.randn(10))
    with pytest.raises(ValueError, match="allowed: moving, fixed, learned"):
        ql.set_qat_scales(fq, "frozen")
    assert fq.scale_mode == "moving"
    weight = ql.FakeQuantize("qint8", "minmax", ch_axis=0, num_channels=2)
    with pytest.raises(ValueError, match="per-tensor"):
        weight.scale_mode = "learned"


@pytest.mark.slow
def test_learned_scales_compile_fullgraph() -> None:
    fq = calibrated(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    (param,) = ql.set_qat_scales(fq, "learned")
    torch._dynamo.reset()
    compiled = torch.compile(fq, fullgraph=True)
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(4)) * 2
    compiled(x).square().sum().backward()
    g_compiled = param.grad.clone()
    param.grad = None
    fq(x).square().sum().backward()
    torch.testing.assert_close(g_compiled, param.grad, rtol=1e-5, atol=0)


def _prepared_model() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = ql.prepare(net.eval(), example_inputs=torch.randn(2, 4))
    ql.calibrate(model, [torch.randn(8, 4) for _ in range(2)])
    return model


def _modes(model: torch.nn.Module) -> dict[str, str]:
    return {name: node.scale_mode for name, node in ql.iter_fake_quantize(model)}


def test_a_bad_item_in_nodes_is_refused_before_any_node_changes() -> None:
    model = _prepared_model()
    nodes = [node for _, node in ql.iter_fake_quantize(model) if node.ch_axis is None]
    before = _modes(model)
    with pytest.raises(TypeError, match=r"nodes\[\d+\].*FakeQuantize.*qualified name.*got int"):
        ql.set_qat_scales(model, "fixed", nodes=[*nodes, 3])
    with pytest.raises(ValueError, match="'head.output_quant' is not a quant node of the module; known:"):
        ql.set_qat_scales(model, "fixed", nodes=[*nodes, "head.output_quant"])
    foreign = calibrated(torch.randn(10))
    with pytest.raises(ValueError, match="not a quant node of the module"):
        ql.set_qat_scales(model, "learned", nodes=[*nodes, foreign])
    assert foreign.scale_mode == "moving" and _modes(model) == before


def test_learned_on_a_weight_node_is_refused_before_any_node_changes() -> None:
    model = _prepared_model()
    names = [name for name, _ in ql.iter_fake_quantize(model)]
    weight = next(n for n in names if n.endswith("weight_quant"))
    before = _modes(model)
    with pytest.raises(ValueError, match=rf"learned.*per-tensor integer.*{weight}"):
        ql.set_qat_scales(model, "learned", nodes=names)
    assert _modes(model) == before


def test_nodes_may_be_given_by_qualified_name_once_each() -> None:
    model = _prepared_model()
    names = [n for n, node in ql.iter_fake_quantize(model) if node.ch_axis is None and node.dtype.is_integer]
    params = ql.set_qat_scales(model, "learned", nodes=[names[0], names[0], names[1]])
    nodes = dict(ql.iter_fake_quantize(model))
    assert [p is nodes[n].scale_param for p, n in zip(params, names[:2], strict=True)] == [True, True]
    assert {n for n, mode in _modes(model).items() if mode == "learned"} == set(names[:2])
    (param,) = ql.set_qat_scales(model, "learned", nodes=names[2])  # one name alone
    assert param is nodes[names[2]].scale_param


def test_module_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="set_qat_scales: expected an nn.Module"):
        ql.set_qat_scales("model", "fixed")  # type: ignore[arg-type]
