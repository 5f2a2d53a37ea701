"""adaround: learned rounding is never worse than nearest on its objective, and frozen into the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.ptq import AdaRoundConfig, adaround
from tests.ptq.models import calibrated


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fc(self.bn(self.conv(x)).flatten(1))


def _calibrated(xs: list[Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    return calibrated(model, xs)


def _data() -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(16, 2, 6, 6, generator=gen) for _ in range(3)]


def test_never_worse_than_nearest_and_frozen_on_the_grid() -> None:
    xs = _data()
    qm = _calibrated(xs)
    ops = dict(ql.iter_quant_ops(qm))
    fc = ops["fc"]
    w_float = fc.module.weight.detach().clone()
    scale = fc.weight_quant.scale.detach().clone().unsqueeze(1)
    inputs: list[Tensor] = []  # the fc's quantized inputs, recorded independently of adaround
    handle = fc.register_forward_pre_hook(lambda _m, a: inputs.append(fc.input_quant[0](a[0]).detach()))
    result = adaround(qm, xs, config=AdaRoundConfig(iterations=200, max_samples=10_000))
    handle.remove()
    rows = {r.name: r for r in result.rows}
    assert set(rows) == {"conv", "fc"} and not result.skipped
    for row in rows.values():
        assert row.adaround_error <= row.nearest_error
    # float64 recomputation of the objective for the linear op on the inputs it saw (the last pass = fc's)
    x = torch.cat(inputs[-3:]).double()
    w_new = fc.module.weight.detach().double()
    nearest = (torch.round(w_float / scale).clamp(-128, 127) * scale).double()
    target = F.linear(x, w_float.double())
    err_new = float((F.linear(x, w_new) - target).square().mean())
    err_nearest = float((F.linear(x, nearest) - target).square().mean())
    assert err_new <= err_nearest * (1 + 1e-9)
    assert rows["fc"].kept == "adaround" and rows["fc"].flipped > 0 and err_new < err_nearest
    # frozen: integer codes on the pinned scale, which the fake quant reproduces exactly
    codes = w_new / scale.double()
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert fc.weight_quant.is_fixed
    torch.testing.assert_close(fc.weight_quant(fc.module.weight), fc.module.weight, rtol=0, atol=0)


def test_folded_conv_bn_weight_lands_on_the_grid() -> None:
    xs = _data()
    qm = _calibrated(xs)
    conv_op = dict(ql.iter_quant_ops(qm))["conv"]
    adaround(qm, xs, config=AdaRoundConfig(iterations=20))
    bn = conv_op.bn
    fold = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().reshape(-1, 1, 1, 1)
    codes = conv_op.conv.weight.detach() * fold / conv_op.weight_quant.scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


def test_bad_config_and_uncalibrated_model_are_refused() -> None:
    with pytest.raises(ValueError, match="iterations"):
        AdaRoundConfig(iterations=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        AdaRoundConfig(lr=0.0)
    xs = _data()
    qm = ql.prepare(_Net().eval(), example_inputs=xs[0])
    with pytest.raises(ValueError, match="calibrate the model first"):
        adaround(qm, xs)
