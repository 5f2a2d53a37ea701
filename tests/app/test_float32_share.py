"""summary.md shows the share of FLOPs left float32 and the cost prices it (a partly float model is never
reported as all-int8 at cost 1.00)."""

from __future__ import annotations

import warnings

import torch

from qat_lightning.app.costs import quant_stats
from qat_lightning.app.session import StageResult
from qat_lightning.app.summary import Summary, render_markdown
from qat_lightning.quant import not_quantized_share, prepare
from tests.models import GeluResidual


def test_float_ops_show_in_the_share_and_the_cost():
    model, x = GeluResidual().eval(), torch.randn(2, 8)
    fx = prepare(model, x, method="fx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = prepare(model, x, method="eager")
    assert not_quantized_share(fx) == (0, 0.0)
    count, share = not_quantized_share(eager)
    assert count == 3 and share == 160 / 304  # gelu + add: 16 FLOPs each, b (fed by the add) 128, of 304
    assert quant_stats(fx, "j6p")[2] == 1.0
    cost = quant_stats(eager, "j6p")[2]
    assert cost == (16 + 128 + 16 * (128 + 32)) / 304  # the float32 ops (and the gemm b) at factor 16
    row = StageResult("calibration", "int8", 0.9, 1.0, 0.0, 0.0, cost, float32_share=share)
    text = render_markdown(Summary("run", rows=[row]))
    assert "float32 (not quantized)" in text and "| 52.6% |" in text
