"""Weight fake quant: the BN-folded QAT path against the unfused chain ``wq(w * fold) / fold``."""

from __future__ import annotations

import copy

import pytest
import torch

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.nodes.weight_quant import fake_quantize_folded, quantize_weight
from tests.tracing import traced_ops


def _weight_node(weight: torch.Tensor) -> FakeQuantize:
    node = FakeQuantize("qint8", "minmax", ch_axis=0, num_channels=weight.shape[0])
    node.state = "qat"
    return node


@pytest.mark.parametrize("negative", [False, True])
def test_folded_weight_equals_the_unfused_chain_up_to_rounding(negative: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.05
    fold = (torch.rand(64) + 0.5).reshape(-1, 1, 1, 1)
    if negative:  # a negative BN gamma gives a negative fold factor
        fold[::3] *= -1
    fast, ref = _weight_node(w), _weight_node(w)
    got = fake_quantize_folded(fast, w, fold)
    want = ref(w * fold) / fold
    # the range is that of w * fold exactly: statistics and scales bit for bit
    for name in ("min_val", "max_val"):
        assert torch.equal(getattr(fast.observer, name), getattr(ref.observer, name))
    assert torch.equal(fast.scale, ref.scale) and bool(fast.scale_ready)
    step = (ref.scale / fold.reshape(-1).abs()).reshape(-1, 1, 1, 1)
    codes_diff = ((got - want).abs() / step).round()
    assert codes_diff.max() <= 1  # a code on a rounding-error tie may move by one step
    assert (codes_diff > 0).float().mean() < 1e-3
    close = codes_diff == 0
    torch.testing.assert_close(got[close], want[close], rtol=2e-7, atol=0)  # otherwise last-bit differences


def test_folded_weight_other_states_run_the_unfused_chain() -> None:
    w = torch.randn(8, 4) * 0.1
    fold = (torch.rand(8) + 0.5).reshape(-1, 1)
    node = _weight_node(w)
    node.state = "calibration"
    node(w * fold)
    node.state = "validation"
    twin = copy.deepcopy(node)
    assert torch.equal(fake_quantize_folded(node, w, fold), twin(w * fold) / fold)
    node.state = "qat"
    node.fix_scale()
    twin.state = "qat"
    twin.fix_scale()
    assert torch.equal(fake_quantize_folded(node, w, fold), twin(w * fold) / fold)


def test_quantize_weight_with_fold_passes_the_gradient_straight_through() -> None:
    w = (torch.randn(16, 8) * 0.1).requires_grad_()
    fold = (torch.rand(16) + 0.5).reshape(-1, 1)
    out = quantize_weight(_weight_node(w), w, fold)
    out.backward(torch.ones_like(out))
    assert torch.equal(w.grad, torch.ones_like(w))


# ------------------------------------------------------------------------- the conv weight's layout op
def _conv_qat() -> tuple[FakeQuantize, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    fold = (torch.rand(8) + 0.5).reshape(-1, 1, 1, 1)
    return _weight_node(weight), weight, fold


def test_channels_last_weight_op_passes_opcheck() -> None:
    from qat_lightning.quant.nodes.weight_quant import _channels_last_weight

    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    torch.library.opcheck(_channels_last_weight, (w,))
    out = _channels_last_weight(w)
    assert torch.equal(out, w) and out.is_contiguous(memory_format=torch.channels_last)


def test_gemm_weight_is_the_weight_itself_in_eager_mode() -> None:
    from qat_lightning.quant.nodes.weight_quant import gemm_weight

    w = torch.randn(8, 4, 3, 3)
    computed = w * 2
    assert gemm_weight(computed, w) is computed and gemm_weight(w, w) is w


@pytest.mark.parametrize("layout_optimization", [True, False])
def test_traced_conv_weight_goes_through_the_layout_op_only_with_layout_optimization(
    layout_optimization: bool,
) -> None:
    import torch._inductor.config as inductor_config

    node, weight, fold = _conv_qat()
    x = torch.randn(2, 4, 8, 8)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, quantize_weight(node, weight, fold))

    with inductor_config.patch(layout_optimization=layout_optimization):
        ops = traced_ops(step, x)
    assert ("qat_lightning.channels_last_weight.default" in ops) is layout_optimization
    eager = _weight_node(weight)  # same values, same straight-through gradient
    y = step(x)
    y.sum().backward()
    grad = weight.grad.clone()
    weight.grad = None
    torch.nn.functional.conv2d(x, quantize_weight(eager, weight, fold)).sum().backward()
    assert torch.equal(grad, weight.grad)


def test_exported_conv_has_no_layout_op() -> None:
    node, weight, fold = _conv_qat()
    node.state = "validation"

    class Conv(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, quantize_weight(node, weight.detach(), fold))

    program = torch.export.export(Conv(), (torch.randn(2, 4, 8, 8),))
    assert not any("channels_last_weight" in str(n.target) for n in program.graph.nodes)
