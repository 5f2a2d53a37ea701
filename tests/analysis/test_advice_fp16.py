"""fp16 diagnoses: LayerNorm overflow (auto scaling on/off/none), sigmoid, grid_sample; healthy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from analysis_toys import QElementwise, QInput
from qat_lightning.analysis.advice.fp16 import diagnose_fp16, render_fp16
from torch import nn

import qat_lightning as ql


class Net(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain
        self.quant = QInput("quant", ql.float16)
        self.ln = QElementwise("ln", lambda x: F.layer_norm(x, x.shape[-1:]), "LayerNorm", ql.float16)
        self.sig = QElementwise("sig", torch.sigmoid, "sigmoid", ql.float16)
        self.gs = QElementwise("gs", lambda img, g: F.grid_sample(img, g, align_corners=False), "grid_sample")

    def forward(self, x, img, grid):
        x = self.quant(x) * self.gain
        return self.sig(self.ln(x) * self.gain), self.gs(img, grid)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, 16, generator=g),
        torch.randn(1, 2, 4, 4, generator=g),
        torch.rand(1, 3, 3, 2, generator=g) * 2 - 1,
    )


def test_large_activations_are_flagged_with_template_lines():
    diag = diagnose_fp16(Net(gain=400.0), _inputs())
    kinds = {(f.op_name, f.kind) for f in diag.findings}
    assert ("ln", "intermediate_overflow") in kinds and ("sig", "precision") in kinds
    assert ("gs", "coordinate") in kinds
    sig = next(f for f in diag.findings if f.kind == "precision")
    assert sig.template == "ModuleNameTemplate({'sig': ql.float32})" and "fp32" in sig.advice
    grid = next(f for f in diag.findings if f.kind == "coordinate")
    assert "'dtype': ql.qint16, 'threshold':" in grid.template
    norm = next(f for f in diag.findings if f.kind == "intermediate_overflow")
    assert norm.auto_scaling is None and "covers LayerNorm/GroupNorm ops only" in norm.advice  # a toy op
    assert "template: ModuleNameTemplate" in render_fp16(diag)


def test_healthy_model_only_gets_the_coordinate_advice():
    diag = diagnose_fp16(Net(gain=1.0), _inputs())
    assert [(f.op_name, f.kind) for f in diag.findings] == [("gs", "coordinate")]


def test_norm_overflow_reports_whether_automatic_scaling_is_on():
    model = nn.Sequential(nn.LayerNorm(16)).eval()
    setter = ql.QconfigSetter(ql.get_qconfig(), [ql.ModuleNameTemplate({"": ql.float16})], chip="j6p")
    prepared = ql.prepare(model, example_inputs=torch.randn(2, 16), qconfig_setter=setter)
    x = torch.randn(4, 16) * 1000.0
    (on,) = [f for f in diagnose_fp16(prepared, x).findings if f.kind == "intermediate_overflow"]
    assert on.op_name == "0" and on.auto_scaling is True
    assert "scaling is on" in on.advice and "2^-6" in on.advice and "nothing to do" in on.advice
    assert on.template == "" and "template:" not in render_fp16(diagnose_fp16(prepared, x))
    assert ql.set_fp16_norm_scaling(prepared, False) == ["0"]
    (off,) = [f for f in diagnose_fp16(prepared, x).findings if f.kind == "intermediate_overflow"]
    assert off.auto_scaling is False and "ql.set_fp16_norm_scaling(model, True, prefix='0')" in off.advice
    assert off.template == "ModuleNameTemplate({'0': ql.float32})"
