"""``nn.MultiheadAttention`` decomposed into ops ``prepare`` quantizes (torch.ao's quantizable MHA's shape).

:class:`DecomposedMultiheadAttention` computes what ``nn.MultiheadAttention`` computes, with every
compute step a submodule that has a name in the prepared model:

* ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``: ``nn.Linear`` (gemm ops: input, per-channel weight
  and output quant points), split from ``in_proj_weight`` / ``in_proj_bias`` (or the separate
  ``q/k/v_proj_weight`` of an MHA with ``kdim`` / ``vdim``);
* ``qk_matmul``: :class:`MatMul`, ``(q @ k^T) * head_dim ** -0.5`` (a matmul op: both inputs quantized;
  the scale is applied before the output quant point, where an integer kernel's requantization puts it);
* ``softmax``: ``nn.Softmax(dim=-1)`` (output quant point);
* ``dropout``: ``nn.Dropout`` on the attention weights (as torch);
* ``av_matmul``: :class:`MatMul`, ``probs @ v``.

Head splitting and layout changes are pass-through modules (:data:`LAYOUT_MODULES`: ``q_heads``,
``merge_heads``, ``restore_layout``, ...) so that both prepare paths find each matmul's producers (eager
mode follows tensors only through modules) and no gemm input looks float32 to the model check.

Masks: a boolean mask is applied with ``masked_fill(-inf)`` (moves no value through compute: no op). A
float mask (``attn_mask`` / ``key_padding_mask``, as ``nn.TransformerEncoder`` passes them after
canonicalising) is added by :func:`add_attention_mask`, an op with no quantized implementation: prepare
reports it as a float32 op (a ``-inf`` mask has no int8 encoding), never hides it.

The module exposes ``_qkv_same_embed_dim = False`` and ``in_proj_bias = None`` so that
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` never take their fused eval fast path
(``torch._transformer_encoder_layer_fwd``), which would bypass the submodules and their quant points.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = [
    "MatMul",
    "SplitHeads",
    "MergeHeads",
    "RestoreLayout",
    "LAYOUT_MODULES",
    "DecomposedMultiheadAttention",
    "add_attention_mask",
    "decomposable",
]


class MatMul(nn.Module):
    """``torch.matmul(a, b) * scale`` as a module, so that both prepare paths see it as a named matmul op.

    Args:
        scale: a constant factor applied to the product (``1.0``: none).
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Return ``(a @ b) * scale``."""
        out = torch.matmul(a, b)
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        """Show the scale."""
        return f"scale={self.scale!r}"


class SplitHeads(nn.Module):
    """Data movement only: ``(N, L, E)`` / ``(L, N, E)`` / ``(L, E)`` -> ``(N, H, L, D)`` (keys transposed).

    A module (a pass-through op for both prepare paths) so that eager mode follows the producer of a
    matmul input through it, as fx follows views.
    """

    def __init__(self, num_heads: int, batch_first: bool, keys: bool = False) -> None:
        super().__init__()
        self.num_heads, self.batch_first, self.keys = num_heads, batch_first, keys

    def forward(self, x: Tensor) -> Tensor:
        """Split the last dimension into heads, batch first."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        x = x.reshape(x.size(0), x.size(1), self.num_heads, -1)  # (N, L, H, D); a small ONNX subgraph
        return x.permute(0, 2, 3, 1) if self.keys else x.permute(0, 2, 1, 3)


class MergeHeads(nn.Module):
    """Data movement only: ``(N, H, L, D)`` -> ``(N, L, E)`` (a pass-through op, see :class:`SplitHeads`)."""

    def forward(self, x: Tensor) -> Tensor:
        """Merge the heads into the last dimension."""
        return x.transpose(1, 2).reshape(x.size(0), x.size(2), -1)


class RestoreLayout(nn.Module):
    """Data movement only: ``(N, L, E)`` back to the caller's layout (a pass-through op)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first

    def forward(self, x: Tensor, batched: bool = True) -> Tensor:
        """Undo :class:`SplitHeads`' layout change."""
        if not batched:
            return x.squeeze(0)
        return x if self.batch_first else x.transpose(0, 1)


def add_attention_mask(scores: Tensor, mask: Tensor) -> Tensor:
    """``scores + mask`` for a float attention mask (kept float32: one named op in the fx graph)."""
    return scores + mask


torch.fx.wrap("add_attention_mask")


#: The data-movement modules of the decomposed attention (pass-through: no op, producers traced through).
LAYOUT_MODULES: tuple[type[nn.Module], ...] = (SplitHeads, MergeHeads, RestoreLayout)


def decomposable(mha: nn.MultiheadAttention) -> str | None:
    """Return why ``mha`` cannot be decomposed (``add_bias_kv`` / ``add_zero_attn``), or ``None``."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported by the decomposed attention"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported by the decomposed attention"
    return None


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    lin.to(weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as linears, matmuls and a softmax (same signature and results).

    Build it with :meth:`from_float`; see the module docstring for the ops.
    """

    _qkv_same_embed_dim = False  # the fused transformer fast path checks this: never taken
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        out_proj: nn.Linear,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj
        self.q_heads = SplitHeads(num_heads, batch_first)
        self.k_heads = SplitHeads(num_heads, batch_first, keys=True)
        self.v_heads = SplitHeads(num_heads, batch_first)
        self.qk_matmul = MatMul(self.head_dim**-0.5)
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.av_matmul = MatMul()
        self.merge_heads = MergeHeads()
        self.out_proj = out_proj
        self.restore_layout = RestoreLayout(batch_first)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> DecomposedMultiheadAttention:
        """Build the decomposed module from ``mha`` (weights copied; ``mha`` is left unchanged).

        Raises:
            ValueError: ``mha`` uses ``add_bias_kv`` or ``add_zero_attn`` (see :func:`decomposable`).
        """
        reason = decomposable(mha)
        if reason is not None:
            raise ValueError(reason)
        e = mha.embed_dim
        b = mha.in_proj_bias
        biases = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            weights = (w[:e], w[e : 2 * e], w[2 * e :])
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        pairs = zip(weights, biases, strict=True)
        q, k, v = (_linear(wi.detach(), None if bi is None else bi.detach()) for wi, bi in pairs)
        o = mha.out_proj
        out = _linear(o.weight.detach(), None if o.bias is None else o.bias.detach())
        new = cls(e, mha.num_heads, q, k, v, out, mha.dropout, mha.batch_first)
        return new.train(mha.training)

    def _masked(self, scores: Tensor, mask: Tensor | None, key_padding: bool) -> Tensor:
        if mask is None:
            return scores
        if key_padding:  # (N, S) -> (N, 1, 1, S)
            mask = mask[:, None, None, :]
        elif mask.dim() == 3:  # (N * H, L, S) -> (N, H, L, S)
            mask = mask.unflatten(0, (-1, self.num_heads))
        if mask.dtype == torch.bool:
            return scores.masked_fill(mask, float("-inf"))
        return add_attention_mask(scores, mask)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Compute attention as ``nn.MultiheadAttention.forward`` does (same arguments and outputs).

        ``is_causal`` is a hint that ``attn_mask`` is the causal mask; as in torch, it needs ``attn_mask``.
        """
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention rule)")
        batched = query.dim() == 3
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        q = self.q_heads(self.q_proj(query))  # (N, H, L, D)
        k = self.k_heads(self.k_proj(key))  # (N, H, D, S)
        v = self.v_heads(self.v_proj(value))  # (N, H, S, D)
        scores = self.qk_matmul(q, k)  # (N, H, L, S)
        scores = self._masked(scores, attn_mask, key_padding=False)
        scores = self._masked(scores, key_padding_mask, key_padding=True)
        probs = self.dropout(self.softmax(scores))
        out = self.out_proj(self.merge_heads(self.av_matmul(probs, v)))  # (N, L, E)
        out = self.restore_layout(out, batched)
        if not need_weights:
            return out, None
        weights = probs.mean(dim=1) if average_attn_weights else probs
        return out, weights if batched else weights.squeeze(0)

    def extra_repr(self) -> str:
        """Show the sizes."""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
