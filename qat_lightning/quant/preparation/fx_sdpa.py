"""``F.scaled_dot_product_attention`` in fx prepare: planned and rewritten as the eager attention's ops.

An sdpa call becomes what HuggingFace's eager attention computes::

    matmul(q, k^T) -> mul(scale) -> [mask] -> softmax -> [dropout] -> matmul(., v)

with the same op names (``matmul``, ``mul``, ``add``, ``softmax``, ``dropout``, ``matmul_1`` under the
calling module). A ``dropout_p`` becomes an ``nn.Dropout(dropout_p)`` module of the prepared model, which
follows ``train()`` / ``eval()``: a model traced in train mode (``dropout_p=p if self.training else 0``,
as HuggingFace and torch write it) does not drop attention weights in ``eval()``. ``enable_gqa`` repeats
the key and value heads (``repeat_interleave``, as torch's math sdpa). A call whose ``dropout_p`` or
``enable_gqa`` is computed in ``forward`` stays one float32 op (a ``FloatOp``, reason
:data:`SDPA_FLOAT_REASON`): its matmuls are not quantized, and the report says so.

The scale ``mul`` is an op with its own output quant point. The mask step (an ``attn_mask`` or
``is_causal``) is, like the eager attention's mask add, a float32 op (``FloatOp`` ``add``, reason
:data:`~.fx_masks.MASK_REASON`): the report, the dtype shares, the costs and the chip's float-op rule see
it, and the softmax reads float scores. Only an additive mask that is a real activation (a learned bias,
not mask-like) becomes a quantized ``add`` op, as it would in eager code.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx import Node

__all__ = [
    "SDPA_ARGS", "SDPA_FLOAT_REASON", "SdpaPlan", "bind_sdpa", "gqa_repeat", "rewrite_sdpa", "sdpa_mask",
    "sdpa_scores",
]  # fmt: skip

#: Positional parameter names of ``F.scaled_dot_product_attention``.
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")

#: Why an sdpa call was left as one float32 op.
SDPA_FLOAT_REASON = "sdpa whose dropout_p or enable_gqa is computed in forward (kept as one float32 op)"


@dataclass(frozen=True)
class SdpaPlan:
    """The op names one decomposed sdpa call becomes.

    Attributes:
        matmul: ``q @ k^T``.
        mul: the scale multiply (an op with an output quant point).
        mask: the mask step: ``None`` without a mask, ``"float"`` for a float32 mask op (recorded as a
            ``FloatOp``), else the name of a quantized ``add`` op (an additive mask that is an activation).
        softmax: the softmax.
        matmul_1: ``probs @ v``.
        scale: the scale factor (``1/sqrt(head_dim)`` unless given); ``None``: the call's ``scale`` node.
        dropout: name of the ``nn.Dropout`` module on the attention weights, ``None`` without dropout.
        dropout_p: its probability.
        gqa: whether the key and value heads are repeated to the query's (``enable_gqa``).
    """

    matmul: str
    mul: str
    mask: str | None
    softmax: str
    matmul_1: str
    scale: float | None
    dropout: str | None = None
    dropout_p: float = 0.0
    gqa: bool = False


def bind_sdpa(node: Node) -> dict[str, Any]:
    """Return the arguments of an sdpa ``call_function`` node by parameter name."""
    bound = dict(zip(SDPA_ARGS, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def sdpa_mask(
    scores: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """Mask scaled attention scores as ``F.scaled_dot_product_attention`` does (bool: keep ``True``)."""
    if is_causal:
        keep = torch.ones(scores.size(-2), scores.size(-1), dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def sdpa_scores(
    scores: torch.Tensor,
    query: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scale and mask attention scores as ``F.scaled_dot_product_attention`` does (decomposed sdpa)."""
    scores = scores * (1.0 / math.sqrt(query.size(-1)) if scale is None else scale)
    return sdpa_mask(scores, attn_mask, is_causal)


def sdpa_scale(head_dim: int, scale: Any) -> float | None:
    """Return the factor sdpa multiplies the scores by: ``scale``, ``1/sqrt(head_dim)``, or ``None``.

    ``None``: ``scale`` is a graph node (computed in ``forward``); the rewrite passes it at run time.
    """
    if isinstance(scale, Node):
        return None
    return float(scale) if isinstance(scale, (int, float)) else 1.0 / math.sqrt(head_dim)


def gqa_repeat(kv: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Repeat the key / value heads (dim -3) to the query's number of heads, as sdpa's ``enable_gqa``."""
    return kv.repeat_interleave(query.size(-3) // kv.size(-3), -3)


def rewrite_sdpa(graph: fx.Graph, node: Node, plan: SdpaPlan) -> None:
    """Replace the sdpa ``node`` by the planned op modules (added to the graph module beforehand)."""
    bound = bind_sdpa(node)
    mask, causal = bound.get("attn_mask"), bound.get("is_causal", False)
    key, value = bound["key"], bound["value"]
    with graph.inserting_before(node):
        if plan.gqa:
            key = graph.call_function(gqa_repeat, (key, bound["query"]))
            value = graph.call_function(gqa_repeat, (value, bound["query"]))
        kt = graph.call_method("transpose", (key, -2, -1))
        scores = graph.call_module(plan.matmul, (bound["query"], kt))
        factor = plan.scale if plan.scale is not None else bound["scale"]
        scores = graph.call_module(plan.mul, (scores, factor))
        if plan.mask == "float":
            scores = graph.call_function(sdpa_mask, (scores, mask, causal))
        elif plan.mask is not None:
            scores = graph.call_module(plan.mask, (scores, mask))
        probs = graph.call_module(plan.softmax, (scores,), {"dim": -1})
        if plan.dropout is not None:
            probs = graph.call_module(plan.dropout, (probs,))
        out = graph.call_module(plan.matmul_1, (probs, value))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


#: The functions the scale multiply and a quantized mask add call.
MUL, ADD = operator.mul, operator.add
