"""When a QAT quant node writes its result into the op's output (qat_lightning.quant.backends.overwrite)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.quant.backends.overwrite import overwrite_target
from qat_lightning.quant.nodes import functional
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, set_fake_quantize
from qat_lightning.quant.prepare import prepare
from tests.models import TinyEncoder, TinyResNet

needs_kernels = pytest.mark.skipif(not functional.kernels_available(), reason="fused kernels not built")


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)


def test_fresh_results_of_ops_that_keep_no_output_may_be_overwritten() -> None:
    x, w, b = _leaf(4, 8), _leaf(8, 8), _leaf(8)
    for y in (F.linear(x, w, b), x @ w, x + 1, x * 0.5, F.layer_norm(x, (8,)), F.gelu(x), torch.cat([x, x])):
        assert overwrite_target(y) is y


def test_results_autograd_keeps_are_never_overwritten() -> None:
    x = _leaf(4, 8)
    for y in (F.softmax(x, -1), torch.sigmoid(x), torch.tanh(x), x.exp(), F.relu(x)):
        assert overwrite_target(y) is None, y.grad_fn
    assert overwrite_target(x) is None  # a leaf
    assert overwrite_target(torch.randn(3)) is None  # no autograd history


def test_reshaped_results_give_their_base_and_partial_views_nothing() -> None:
    x3, w, b = _leaf(2, 5, 8), _leaf(8, 8), _leaf(8)
    y = F.linear(x3, w, b)  # a view of the addmm result
    assert y._is_view() and overwrite_target(y) is y._base
    m = torch.matmul(x3, x3.transpose(1, 2))  # an unsafe view of the bmm result: not a view
    assert overwrite_target(m) is m
    s = (x3 * 2)[:, :3]
    assert overwrite_target(s) is None  # a part of its base
    t = (x3 * 2).transpose(1, 2)
    assert overwrite_target(t) is None  # not contiguous
    r = F.softmax(x3, -1).view(10, 8)
    assert overwrite_target(r) is None  # the base's producer keeps it


def test_custom_function_results_are_never_overwritten() -> None:
    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
            y = x * 2
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
            return g * 2

    assert overwrite_target(Keep.apply(_leaf(3))) is None


def _calibrated_node(x: torch.Tensor) -> FakeQuantize:
    fq = FakeQuantize("qint8", "minmax")
    set_fake_quantize(fq, FakeQuantState.CALIBRATION)
    fq(x.detach())
    set_fake_quantize(fq, FakeQuantState.QAT)
    return fq


@needs_kernels
def test_forward_owned_overwrites_the_result_with_the_same_values_and_gradients() -> None:
    x, w, b = _leaf(2, 64, 32), _leaf(48, 32), _leaf(48)
    fused, plain = (_calibrated_node(F.linear(x, w, b) * 0.9) for _ in range(2))
    y = F.linear(x, w, b)
    storage = y.data_ptr()
    out = fused.forward_owned(y)
    ref = plain(F.linear(x, w, b))
    assert out.data_ptr() == storage  # written into the linear's result
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert torch.equal(fused.scale, plain.scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (gx,) = torch.autograd.grad(out, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(gx, rx)


@needs_kernels
def test_forward_owned_keeps_the_input_when_a_hook_could_see_it() -> None:
    x = _leaf(64, 64)
    fq = _calibrated_node(x * 2)
    seen = []
    fq.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    y = x * 2
    before = y.detach().clone()
    out = fq.forward_owned(y)
    assert out.data_ptr() != y.data_ptr() and torch.equal(seen[0], before)


@needs_kernels
def test_forward_owned_keeps_the_input_when_a_global_pre_hook_could_see_it() -> None:
    x = _leaf(64, 64)
    fq = _calibrated_node(x * 2)
    seen = []
    handle = nn.modules.module.register_module_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        y = x * 2
        before = y.detach().clone()
        out = fq.forward_owned(y)
    finally:
        handle.remove()
    assert out.data_ptr() != y.data_ptr() and torch.equal(seen[0], before)
    y = x * 2
    assert fq.forward_owned(y).data_ptr() == y.data_ptr()  # without hooks: written in place


class TinyAttention(nn.Module):
    """Linear, LayerNorm, matmul, softmax, residual add, GELU: every kind of owned result."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 64)
        self.act = nn.GELU()
        self.out = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.inp(x))
        attn = F.softmax(torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * 0.125, dim=-1)
        h = h + torch.matmul(attn, self.v(h))
        return self.out(self.act(self.fc(h)))


MODELS = {
    "attention": (TinyAttention, (4, 10, 16)),
    "resnet": (TinyResNet, (4, 3, 16, 16)),
    "encoder": (TinyEncoder, None),
}


@needs_kernels
@pytest.mark.parametrize("family", sorted(MODELS))
def test_prepared_model_training_is_unchanged_by_writing_in_place(
    monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    torch.manual_seed(0)
    cls, shape = MODELS[family]
    float_model = cls()
    if shape is None:
        data = [float_model.example_inputs(4)[0] for _ in range(3)]
    else:
        data = [torch.randn(*shape) for _ in range(3)]
    model = prepare(float_model, data[0])
    set_fake_quantize(model, "calibration")
    with torch.no_grad():
        model(data[1])
    set_fake_quantize(model, "qat")
    twin = copy.deepcopy(model)
    calls = {"owned": 0}
    original = functional._kernel_forward

    def counting(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out, keep = original(x, *args, **kwargs)
        calls["owned"] += out is x
        return out, keep

    monkeypatch.setattr(functional, "_kernel_forward", counting)
    backward = functional._kernel_backward

    def counting_backward(grad, keep, packed, inplace=False):  # noqa: ANN001, ANN202
        calls["grad_in_place"] = calls.get("grad_in_place", 0) + inplace
        return backward(grad, keep, packed, inplace)

    monkeypatch.setattr(functional, "_kernel_backward", counting_backward)
    for m, overwrite in ((model, True), (twin, False)):
        if not overwrite:  # the twin: every result and gradient in a new buffer
            monkeypatch.setattr(FakeQuantize, "forward_owned", FakeQuantize.__call__)
            monkeypatch.setattr(functional, "exclusive_grad", lambda holders: False)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for x in data:
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        if overwrite:
            assert calls["owned"] > 0 and calls["grad_in_place"] > 0
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---- backward: the masked gradient goes into the incoming gradient only when nothing else holds it ----
def _clipping_node() -> FakeQuantize:
    fq = _calibrated_node(torch.linspace(-1, 1, 101))  # scale 1/127: |x| > ~1 is clipped
    fq.fix_scale()
    return fq


def _wide(n: int = 4096) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()


def _mask(x: torch.Tensor, scale: float = 1 / 127) -> torch.Tensor:
    v = x.detach() * (1 / torch.tensor(scale))
    return ((v >= -128.5) & (v < 127.5)).float()


@pytest.fixture
def backward_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    original = functional._kernel_backward

    def counting(grad, keep, packed, inplace=False):  # noqa: ANN001, ANN202
        calls.append(inplace)
        return original(grad, keep, packed, inplace)

    monkeypatch.setattr(functional, "_kernel_backward", counting)
    return calls


@needs_kernels
def test_backward_overwrites_an_exclusive_gradient(backward_calls: list[bool]) -> None:
    fq, x = _clipping_node(), _wide()
    c = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    (fq(x * 1) * c).sum().backward()
    assert backward_calls == [True]
    assert torch.equal(x.grad, c * _mask(x))


@needs_kernels
def test_backward_keeps_a_gradient_shared_with_another_branch(backward_calls: list[bool]) -> None:
    fq, x = _clipping_node(), _wide()
    w, v = torch.zeros(x.shape, requires_grad=True), torch.zeros(x.shape, requires_grad=True)
    c = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    other = v * 1  # created first: its backward runs after the quant node's
    ((fq(x * 1) + other) * c).sum().backward()  # the add hands the same gradient to both branches
    assert backward_calls == [False]
    assert torch.equal(v.grad, c)  # unmasked
    assert torch.equal(x.grad, c * _mask(x))
    ((fq(x * 1) + w) * c).sum().backward()  # the other branch a leaf
    assert torch.equal(w.grad, c)


@needs_kernels
def test_backward_keeps_a_gradient_a_hook_stored(backward_calls: list[bool]) -> None:
    fq, x = _clipping_node(), _wide()
    c = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    stored: list[torch.Tensor] = []
    y = fq(x * 1)
    y.register_hook(stored.append)
    (y * c).sum().backward()
    assert backward_calls == [False]
    assert torch.equal(stored[0], c) and torch.equal(x.grad, c * _mask(x))


@needs_kernels
def test_backward_keeps_a_gradient_autograd_grad_returns(backward_calls: list[bool]) -> None:
    fq, x = _clipping_node(), _wide()
    c = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    y = fq(x * 1)
    gx, gy = torch.autograd.grad((y * c).sum(), [x, y])
    assert torch.equal(gy, c) and torch.equal(gx, c * _mask(x))


@needs_kernels
def test_backward_into_a_view_gradient_and_with_create_graph(backward_calls: list[bool]) -> None:
    fq, x = _clipping_node(), _wide()
    c = torch.rand(x.numel(), generator=torch.Generator().manual_seed(4))
    (fq((x * 1).view(64, 64)).view(-1) * c).sum().backward()  # the gradient arrives as a view
    assert backward_calls == [True]
    assert torch.equal(x.grad, c * _mask(x))
    c.requires_grad_()
    y = fq(x * 1)
    (g,) = torch.autograd.grad((y * c).sum(), [x], create_graph=True)  # a gradient that needs grad
    assert backward_calls[-1] is False and torch.equal(g, c * _mask(x))
