"""What ``prepare`` knows about each quantized op, shared by templates, reports and analysis.

Every quantized op of a prepared model is a module at the op's name (``layer1.0.conv1``,
``layer1.0.add``, ``encoder.layers.2.attn.matmul_1``) that carries:

* ``op_info``: an :class:`OpInfo` (below);
* ``input_quant``: an ``nn.ModuleList`` of :class:`FakeQuantize`, one per tensor input (gemm ops; a
  ``float32`` node = "take the producer's output as is");
* ``weight_quant``: the per-channel weight :class:`FakeQuantize` of a gemm op, or ``None``;
* ``output_quant``: the output :class:`FakeQuantize`, or ``None``.

The *sensitivity* vocabulary of the seed maps onto these: ``activation`` = the output node (for a
gemm, its input nodes too), ``weight`` = the weight node.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from qat_lightning.quant.nodes.fake_quantize import FakeQuantize

__all__ = ["OpKind", "OpInfo", "FloatOp", "PrepareRecord", "iter_quant_ops", "quant_nodes_of"]


class OpKind(str, enum.Enum):
    """Role of an op for templates and chip rules."""

    GEMM = "gemm"  # conv, conv-transpose, linear, matmul/bmm/@ (input + weight quant points)
    OTHER = "other"  # add, mul, cat, softmax, LayerNorm, GELU, pooling, ... (output quant point)
    INPUT = "input"  # a model input / QuantStub (output quant point)


@dataclass(frozen=True)
class OpInfo:
    """Static facts about one quantized op, recorded at prepare time.

    Attributes:
        name: stable op name (module-style path; ``#k`` suffix for the k-th extra call of a shared module).
        op_type: short type (``Conv2d``, ``ConvBnReLU2d``, ``Linear``, ``add``, ``matmul``, ``LayerNorm``,
            ``quant``).
        kind: gemm / other / input.
        module_path: path of the float module that owns the op (its call count is reported).
        call_index: 0 for the first call site of that module, k for the k-th extra call.
        input_producers: for each tensor input, the name of the op whose output feeds it (``None`` when it
            is not a quantized op, e.g. a parameter or a constant).
        flops: multiply-accumulates per batch of the example input (0 for cheap elementwise ops is not
            used: elementwise ops count one op per output element).
        is_matmul: a gemm between two activations (matmul/bmm/@), which has two activation inputs and no
            weight.
    """

    name: str
    op_type: str
    kind: OpKind
    module_path: str
    call_index: int = 0
    input_producers: tuple[str | None, ...] = ()
    flops: int = 0
    is_matmul: bool = False


def iter_quant_ops(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(op name, op module)`` for every quantized op of a prepared model, in graph order."""
    order = getattr(model, "quant_op_order", None)
    if order is not None:
        modules = dict(model.named_modules())
        for name in order:
            yield name, modules[name]
        return
    for _, module in model.named_modules():
        info = getattr(module, "op_info", None)
        if isinstance(info, OpInfo):
            yield info.name, module


def quant_nodes_of(op: nn.Module) -> dict[str, FakeQuantize]:
    """Return the quant nodes of one op module: ``{"input.0": ..., "weight": ..., "output": ...}``."""
    nodes: dict[str, FakeQuantize] = {}
    for i, node in enumerate(getattr(op, "input_quant", None) or ()):
        nodes[f"input.{i}"] = node
    for key in ("weight", "output"):
        node = getattr(op, f"{key}_quant", None)
        if isinstance(node, FakeQuantize):
            nodes[key] = node
    return nodes


@dataclass(frozen=True)
class FloatOp:
    """An op with a float activation that prepare left without quant points: it computes in float32.

    Attributes:
        name: op name (same naming as quantized ops).
        op_type: short type (``add``, ``gelu``, ``MultiheadAttention``, ...).
        flops: multiply-accumulates per batch of the example input (one per output element for
            elementwise ops; a lower bound for opaque modules).
        reason: why it was left float (eager cannot see functional ops, a mask-like operand, outside the
            QuantStub/DeQuantStub region, an opaque module, a switch disabled in forward, ...).
        on_chip: whether the op is meant to run on the chip (``False`` for ops outside the
            QuantStub/DeQuantStub region of ``jit_strip``, which the deployment strips off): only on-chip
            float ops can violate the chip's rules.
    """

    name: str
    op_type: str
    flops: int
    reason: str
    on_chip: bool = True


@dataclass(frozen=True)
class PrepareRecord:
    """What ``prepare`` did, kept on the prepared model as ``model.prepare_record`` for the check report.

    Attributes:
        method: ``fx`` or ``eager`` (the one actually used).
        qat_mode: ``fuse_bn``, ``with_bn`` or ``freeze_bn``.
        chip: target chip name or ``None``.
        call_counts: float-model module path -> number of calls seen with the example inputs
            (0 = never called, > 1 = shared module).
        fused: groups of module paths that were fused (e.g. ``("layer1.0.conv1", "layer1.0.bn1",
            "layer1.0.relu")``).
        unfused: fusable groups left unfused (with the reason in ``notes``).
        changelog: every qconfig change the chip rules made (downgrades), one line each.
        not_covered: what the eager fallback could not quantize (functional ops it cannot see).
        notes: free-form remarks for the report.
        float_ops: ops left computing in float32 (no quant points), with their FLOPs: the report's
            "not quantized" share.
    """

    method: str
    qat_mode: str
    chip: str | None = None
    call_counts: tuple[tuple[str, int], ...] = ()
    fused: tuple[tuple[str, ...], ...] = ()
    unfused: tuple[tuple[str, ...], ...] = ()
    changelog: tuple[str, ...] = ()
    not_covered: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    float_ops: tuple[FloatOp, ...] = ()
