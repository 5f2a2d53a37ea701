"""dynamic_block(): loops over x.shape[...] in eager mode, refused by fx; the extra-call warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from qat_lightning.quant import FxTraceError, dynamic_block, iter_quant_ops, prepare, set_fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


class RowLoop(nn.Module):
    """Runs ``fc`` once per row: the call count follows the batch size."""

    def __init__(self, dynamic: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.dynamic = dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(x.shape[0]):
            if self.dynamic:
                with dynamic_block():
                    outs.append(self.fc(x[i]))
            else:
                outs.append(self.fc(x[i]))
        return torch.stack(outs)


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    prepared = prepare(model, x, method="eager")
    set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        prepared(x)
    set_fake_quantize(prepared, "validation")
    return prepared


def test_dynamic_block_is_one_call_site_for_any_trip_count(seed):
    model = RowLoop(dynamic=True).eval()
    prepared = _calibrated(model, torch.randn(2, 4))
    assert prepared.quant_op_order == ["x_quant", "fc"]
    fc = dict(iter_quant_ops(prepared))["fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no extra-call warning inside a dynamic block
        with torch.no_grad():
            out = prepared(torch.randn(5, 4))
    assert out.shape == (5, 4)
    assert fc._calls == 5  # every row ran on the one op
    with torch.no_grad():
        set_fake_quantize(prepared, "float")
        x = torch.randn(3, 4)
        torch.testing.assert_close(prepared(x), model(x))


def test_more_calls_than_probed_call_sites_warn(seed):
    prepared = _calibrated(RowLoop(dynamic=False).eval(), torch.randn(2, 4))
    assert prepared.quant_op_order == ["x_quant", "fc", "fc#1"]
    with pytest.warns(
        UserWarning, match=r"fc was called 3 times in this forward but prepare saw 2 call site"
    ):
        with torch.no_grad():
            prepared(torch.randn(3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            prepared(torch.randn(2, 4))  # as probed: no warning


def test_single_call_site_also_warns(seed):
    prepared = _calibrated(RowLoop(dynamic=False).eval(), torch.randn(1, 4))
    with pytest.warns(UserWarning, match=r"fc was called 2 times .* saw 1 call site"):
        with torch.no_grad():
            prepared(torch.randn(2, 4))


@pytest.mark.parametrize("dynamic", [True, False])
def test_fx_refuses_loops_over_shapes_naming_the_line(dynamic):
    with pytest.raises(FxTraceError, match=r"dynamic_block[\s\S]*test_dynamic_block.py:\d+"):
        prepare(RowLoop(dynamic).eval(), torch.randn(2, 4), method="fx")


def test_auto_falls_back_to_eager_for_a_dynamic_block():
    with pytest.warns(UserWarning, match="fell back to eager"):
        prepared = prepare(RowLoop(dynamic=True).eval(), torch.randn(2, 4), method="auto")
    assert prepared.prepare_record.method == "eager" and prepared.quant_op_order == ["x_quant", "fc"]


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        with dynamic_block():
            return self.fc(y)


def test_module_inside_and_outside_a_dynamic_block_is_refused():
    with pytest.raises(ValueError, match="fc: called both inside and outside dynamic_block"):
        prepare(Mixed().eval(), torch.randn(2, 4), method="eager")
