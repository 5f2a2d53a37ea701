"""Shared-module advice: a module called on very different inputs is case C, on similar inputs case B."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from analysis_toys import QInput, QLinear
from qat_lightning.analysis.advice.shared import render_shared_module_advice, shared_module_advice
from torch import nn

import qat_lightning as ql


class Shared(nn.Module):
    """``fc`` called twice (``fc`` and ``fc#1``, one weight): on ``x`` and on ``gain * x + shift``."""

    def __init__(self, gain: float, shift: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gain, self.shift = gain, shift
        self.quant = QInput("quant")
        self.fc = QLinear("fc", 8, 8)
        self.fc_1 = QLinear("fc#1", 8, 8)
        self.fc_1.weight, self.fc_1.bias = self.fc.weight, self.fc.bias
        self.fc_1.op_info = dataclasses.replace(self.fc_1.op_info, module_path="fc", call_index=1)

    def forward(self, x):
        x = self.quant(x)
        return self.fc(x) + self.fc_1(x * self.gain + self.shift)


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    model(x)
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    return model


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_very_different_inputs_are_case_c(with_inputs):
    model = _calibrated(Shared(gain=20.0), X)
    advice = shared_module_advice(model, X if with_inputs else None)
    (finding,) = advice.findings
    assert finding.module_path == "fc" and finding.case == "C" and finding.range_ratio > 10
    assert [s.op_name for s in finding.sites] == ["fc", "fc#1"]
    assert advice.source == ("forward" if with_inputs else "observer")
    text = render_shared_module_advice(advice)
    assert "case C: copy the module" in text and "fc#1 (call 1)" in text


def test_similar_inputs_are_case_b():
    advice = shared_module_advice(_calibrated(Shared(gain=1.1), X), X)
    (finding,) = advice.findings
    assert finding.case == "B" and finding.range_ratio < 2 and finding.mean_shift < 1
    assert "no change needed" in render_shared_module_advice(advice)


def test_no_shared_module_and_bad_options():
    model = nn.Sequential()
    assert shared_module_advice(model).findings == ()
    with pytest.raises(ValueError, match="range_ratio"):
        shared_module_advice(model, range_ratio=0.5)
