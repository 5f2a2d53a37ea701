"""Swap each ``nn.MultiheadAttention`` of a model for its decomposed, quantizable form (fx and eager).

``nn.MultiheadAttention`` computes its projections, matmuls and softmax inside one module (or one fused
kernel): prepare could only keep it float. :func:`decompose_attention` replaces it, at every path it is
reachable from, by :class:`~qat_lightning.quant.nodes.attention.DecomposedMultiheadAttention`, whose
linears, matmuls and softmax are ordinary named ops (``<path>.q_proj``, ``<path>.qk_matmul``,
``<path>.softmax``, ...). A module that cannot be decomposed (a subclass, ``add_bias_kv``,
``add_zero_attn``) stays as it is: prepare reports it as a float32 op, and the returned notes say why.
"""

from __future__ import annotations

from torch import nn

from qat_lightning.quant.nodes.attention import DecomposedMultiheadAttention, decomposable

__all__ = ["decompose_attention", "has_attention"]


def has_attention(model: nn.Module) -> bool:
    """Tell whether ``model`` holds an ``nn.MultiheadAttention`` (or a subclass)."""
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` by its decomposed form.

    A module shared by several paths is replaced by one decomposed module at all of them (weights stay
    shared). ``model`` itself is never replaced (wrap a bare attention module in a container).

    Returns:
        Report notes: one per attention module left as it is, with the reason.
    """
    notes: list[str] = []
    swapped: dict[int, nn.Module] = {}
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if not path or not isinstance(module, nn.MultiheadAttention):
            continue
        if type(module) is not nn.MultiheadAttention:
            notes.append(f"kept float: {path} ({type(module).__name__}, a subclass: its forward may differ)")
            continue
        reason = decomposable(module)
        if reason is not None:
            notes.append(f"kept float: {path} (MultiheadAttention: {reason})")
            continue
        new = swapped.setdefault(id(module), DecomposedMultiheadAttention.from_float(module))
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, new)
    return notes
