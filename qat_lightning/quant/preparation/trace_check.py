"""Replaying the example inputs: cloned inputs, a seeded RNG, and the check that a traced graph matches.

``prepare`` runs the float model once on the example inputs (the reference output); the fx path then runs
the traced float graph the same way (:func:`check_trace`) so a wrong trace is an error or a fallback,
never a silently different model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from qat_lightning.quant.preparation.fx_tracer import FxTraceError

__all__ = ["check_trace", "clone_tree", "outputs_match", "seeded"]


def clone_tree(tree: Any) -> Any:
    """Clone every tensor of a (nested) input structure."""
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, tree)


@contextmanager
def seeded(device: torch.device | None, seed: int = 0) -> Any:
    """Run the block with the RNG (CPU and ``device``'s CUDA) seeded, restoring its state afterwards."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def outputs_match(ref: Any, out: Any) -> str | None:
    """Return ``None`` when the outputs agree (float tensors to 1e-4 relative), else a description."""
    ref_leaves, ref_spec = tree_flatten(ref)
    out_leaves, out_spec = tree_flatten(out)
    if len(ref_leaves) != len(out_leaves):
        return f"the output structure differs ({ref_spec} vs {out_spec})"
    for i, (a, b) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return f"output {i} is a tensor in one model only"
        if not isinstance(a, Tensor):
            continue
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if a.is_floating_point():
            err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            tol = 1e-4 * float(a.double().abs().max()) + 1e-6 if a.numel() else 0.0
            if not err <= tol:
                return f"output {i} differs by {err:.3g} (tolerance {tol:.3g})"
        elif not torch.equal(a, b):
            return f"output {i} differs"
    return None


def check_trace(traced: nn.Module, ref: Any, args: Any, kwargs: Any, device: Any) -> None:
    """Run the traced float graph like the probe run (same RNG seed); restore every buffer afterwards."""
    saved = [(b, b.detach().clone()) for b in traced.buffers()]
    try:
        with torch.no_grad(), seeded(device):
            out = traced(*clone_tree(args), **clone_tree(kwargs))
    except Exception as exc:
        raise FxTraceError(
            f"the traced model fails on the example inputs ({type(exc).__name__}: {exc}); "
            "use method='eager' or method='auto'"
        ) from exc
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
    problem = outputs_match(ref, out)
    if problem is not None:
        raise FxTraceError(
            f"the traced graph does not reproduce the model on the example inputs: {problem}. "
            "Some Python logic was fixed at trace time; use method='eager' or method='auto'"
        )
