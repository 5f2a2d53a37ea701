"""The op module of an ``nn.Embedding``: a lookup in the per-row quantized table.

As torch.ao treats embeddings, the weight is quantized per row (``ch_axis=0``: one scale per token, since
rows differ widely in range) and the lookup returns the rows of the fake-quantized table; the indices are
integers, so the op has no input quant point. The output quant point follows the op's qconfig like every
op's (``output_dtype=None``: none, the rows go on at their per-row scales, torch.ao's weight-only
embedding; the default ``qint8``: requantized per tensor, what an int8 consumer such as an add needs).
In ONNX the table is an integer initializer read through ``DequantizeLinear`` before the ``Gather``.

``max_norm``: as ``F.embedding`` does, the rows of the *real* weight that the batch looks up are
renormalised in place first (``torch.embedding_renorm_`` under ``no_grad``, in every state, as the float
module does), then the table is fake-quantized and looked up with ``max_norm=None``. The output rows are
thus on the per-row grid of the renormalised weight (renormalising the fake-quantized table instead would
move them off it, and in QAT modify a straight-through view in place).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.nodes.qat_modules import QuantOp, quantize_weight
from qat_lightning.quant.ops import OpInfo

__all__ = ["QatEmbedding"]


class QatEmbedding(QuantOp):
    """``nn.Embedding`` with a per-row weight quant point (and the qconfig's output quant point, if any).

    Args:
        info: the op's :class:`OpInfo` (a gemm-kind op: its compute dtype is its weight's).
        module: the float ``nn.Embedding`` (kept as child ``module``; its weight is shared, not copied).
        weight_quant: the per-row (``ch_axis=0``) weight quant node.
        output_quant: the output quant node, or ``None``.
    """

    def __init__(
        self,
        info: OpInfo,
        module: nn.Embedding,
        weight_quant: FakeQuantize,
        output_quant: FakeQuantize | None,
        input_quant: Sequence[FakeQuantize] = (),
    ) -> None:
        super().__init__(info, input_quant, weight_quant, output_quant)
        self.module = module

    def _forward(self, indices: Tensor) -> Tensor:
        m = self.module
        if m.max_norm is not None:
            _renorm_rows(m.weight, indices, m.max_norm, m.norm_type)
        weight = quantize_weight(self.weight_quant, m.weight)
        out = F.embedding(indices, weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        return self._out(out)


def _renorm_rows(weight: Tensor, indices: Tensor, max_norm: float, norm_type: float) -> None:
    """Renormalise in place the rows of ``weight`` that ``indices`` look up, as ``F.embedding`` does.

    Args:
        weight: the float embedding table (a parameter; changed without autograd).
        indices: the looked-up row indices.
        max_norm: rows whose ``norm_type``-norm exceeds it are scaled down to it.
        norm_type: the p of the p-norm.
    """
    with torch.no_grad():
        torch.embedding_renorm_(weight, indices.contiguous(), max_norm, norm_type)
