"""fx prepare routes the uses after an in-place op to the op: the consumer reads its quantized output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.ops import iter_quant_ops


class AddInplace(nn.Module):
    """``y.add_(z)`` with the result not rebound (torchvision style)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        y.add_(self.d(x))
        return self.c2(y)


class SqueezeExciteInplace(nn.Module):
    """An SE block that scales in place: ``x.mul_(w)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        x.mul_(torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True))))
        return self.c2(x)


class HardtanhInplace(nn.Module):
    """``F.hardtanh(y, inplace=True)`` with the result not rebound."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        F.hardtanh(y, -0.3, 0.3, inplace=True)
        return self.c2(y)


class ChainedInplace(nn.Module):
    """Two in-place ops in a row, then the tensor returned: ``y.add_(z); y.mul_(2.0); return c2(y), y``."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.c(x)
        y.add_(self.d(x))
        y.mul_(self.d(x))
        return self.c2(y), y


def _leaves(out: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("model_cls", [AddInplace, SqueezeExciteInplace, HardtanhInplace, ChainedInplace])
def test_consumer_of_an_in_place_result_reads_it_on_its_reported_grid(model_cls: type) -> None:
    """c2 read the float in-place result (~0.5 LSB off the grid) while its producer was reported as ``c``."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    float_model = model_cls().eval()
    p = ql.prepare(copy.deepcopy(float_model), example_inputs=(x,), method="fx")
    ql.calibrate(p, [x])
    ops = dict(iter_quant_ops(p))
    producer = ops["c2"].op_info.input_producers[0]
    assert producer != "c"  # the in-place op, not the tensor it mutated
    seen: dict[str, torch.Tensor] = {}
    handle = ops["c2"].register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        p(x)
    handle.remove()
    codes = seen["x"] / ops[producer].output_quant.scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert all(row.input_dtype != "float32" for row in ql.check_model(p).out_qconfigs if row.name == "c2")
    ql.set_fake_quantize(p, "float")
    with torch.no_grad():
        got, want = _leaves(p(x)), _leaves(float_model(x))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
