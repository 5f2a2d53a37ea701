"""FLOP (MAC) counts of functional gemms, against M*K*N; and what prepare records for float ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.preparation.op_costs import function_flops


@pytest.mark.parametrize(
    ("base", "shapes", "out", "equation", "macs"),
    [
        ("mm", [(3, 4), (4, 5)], (3, 5), None, 3 * 4 * 5),
        ("addmm", [(5,), (3, 4), (4, 5)], (3, 5), None, 3 * 4 * 5),
        ("baddbmm", [(2, 3, 5), (2, 3, 4), (2, 4, 5)], (2, 3, 5), None, 2 * 3 * 4 * 5),
        ("addbmm", [(3, 5), (6, 3, 4), (6, 4, 5)], (3, 5), None, 6 * 3 * 4 * 5),
        ("mv", [(3, 4), (4,)], (3,), None, 12),
        ("dot", [(7,), (7,)], (), None, 7),
        ("einsum", [None, (2, 3, 4), (2, 4, 5)], (2, 3, 5), "bij,bjk->bik", 2 * 3 * 4 * 5),
        ("einsum", [None, (3, 4), (4, 5)], (3, 5), "ij,jk", 3 * 4 * 5),
        ("einsum", [None, (7, 2, 3, 4), (7, 2, 4, 5)], (7, 2, 3, 5), "...ij, ...jk -> ...ik", 7 * 2 * 60),
        ("einsum", [None, (2, 8, 6), (2, 9, 6)], (2, 8, 9), "bqd,bkd->bqk", 2 * 8 * 9 * 6),
    ],
)
def test_functional_gemm_macs_are_the_product_of_the_matmul_dims(base, shapes, out, equation, macs) -> None:
    assert function_flops(base, shapes, out, equation) == macs


class _FunctionalGemms(nn.Module):
    """Gemms prepare leaves float (functional ``addmm`` / ``mm`` / ``einsum`` on parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 32))
        self.b1 = nn.Parameter(torch.randn(32))
        self.w2 = nn.Parameter(torch.randn(32, 32))
        self.w3 = nn.Parameter(torch.randn(32, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b1, x, self.w1)
        h = torch.mm(h, self.w2)
        h = torch.einsum("nk,km->nm", h, self.w3)
        return self.fc(h)


def test_prepare_records_float_functional_gemms_with_their_macs() -> None:
    """GPT-2's Conv1D traces to addmm: it was counted 64x too cheap (one op per output element)."""
    x = torch.randn(4, 16)
    model = ql.prepare(_FunctionalGemms(), (x,))
    flops = {op.op_type: op.flops for op in model.prepare_record.float_ops}
    assert flops.get("addmm") == 4 * 16 * 32
    assert flops.get("mm") == 4 * 32 * 32
    assert flops.get("einsum") == 4 * 32 * 8
