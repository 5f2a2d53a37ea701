"""A sparse gradient through the ``cpu_kernels`` backward (``nn.Embedding(sparse=True)`` behind a node)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sparse_masked"]


def sparse_masked(grad: Tensor, mask: Tensor, packed: bool) -> Tensor:
    """Return a sparse COO ``grad``'s values where the forward's mask is set, at its indices (still sparse).

    Args:
        grad: sparse COO gradient (sparse dims first, then dense dims) of a contiguous tensor.
        mask: the C forward's mask over that tensor's elements: one bit each (``packed``; bit ``i % 8`` of
            byte ``i // 8``) or one byte each.
        packed: whether ``mask`` holds bits.
    """
    grad = grad.coalesce()
    values = grad.values()
    strides = torch.empty(grad.shape, device="meta").stride()[: grad.sparse_dim()]
    base = (grad.indices() * torch.tensor(strides).unsqueeze(1)).sum(0)
    flat = base.unsqueeze(1) + torch.arange(math.prod(values.shape[1:]))  # element indices, (nnz, inner)
    keep = (mask[flat // 8] >> (flat % 8)) & 1 if packed else mask[flat]
    kept = torch.where(keep.reshape(values.shape) != 0, values, 0.0)
    return torch.sparse_coo_tensor(grad.indices(), kept, grad.shape, is_coalesced=True)
