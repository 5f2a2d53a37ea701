"""Weight fake quant: the BN-folded QAT path against the unfused chain ``wq(w * fold) / fold``."""

from __future__ import annotations

import copy

import pytest
import torch

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.nodes.weight_quant import fake_quantize_folded, quantize_weight


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
