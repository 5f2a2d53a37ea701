"""fp16 diagnoses: LayerNorm intermediate overflow, sigmoid on large logits, grid_sample; healthy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from analysis_toys import QElementwise, QInput
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis.advice_fp16 import diagnose_fp16, render_fp16


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
    assert "prepare" in next(f for f in diag.findings if f.kind == "intermediate_overflow").advice
    assert "template: ModuleNameTemplate" in render_fp16(diag)


def test_healthy_model_only_gets_the_coordinate_advice():
    diag = diagnose_fp16(Net(gain=1.0), _inputs())
    assert [(f.op_name, f.kind) for f in diag.findings] == [("gs", "coordinate")]
