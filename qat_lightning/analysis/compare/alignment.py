"""Align the ops of a prepared model with the modules of the original float model.

Single-model analysis needs no alignment: the float reference is the prepared model itself with its
quant nodes in FLOAT, so every op is compared with itself. When a separate float model is given, each op
is matched to the float module whose output equals the op's float output, by ``OpInfo.module_path``:

1. a fused op (``PrepareRecord.fused`` group starting at the op's module path, e.g. conv → bn → relu)
   is matched to the *last* module of the group, at the call the group names (``layer1.0.relu#1`` = the
   second call of the shared ``layer1.0.relu``, torchvision style);
2. a model-input op (``<arg>_quant`` at the model root) is matched to the float model's argument
   ``<arg>`` (its float value is the input itself);
3. otherwise the float module at ``module_path`` is used when it is the same kind of op: its class name
   equals ``op_type`` (``Linear``, ``Conv2d``, ``LayerNorm``), it is a ``QuantStub``/``Identity`` for an
   input op, or it is itself an op module of the same name (a prepared copy run in FLOAT); the op's
   ``call_index``-th call of that module is the one compared.

What cannot be aligned, and is reported as such: functional ops and operators (``add``, ``matmul``,
``cat`` written in a ``forward``: no float module produces exactly their output), ops whose float
module is missing or of another kind, any op whose float output turns out to have another shape
(checked at run time), and any op whose float module the float model does not call as often as the
name says. For a complete,
name-exact comparison use the single-model form ``QuantAnalysis(calib_model)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from qat_lightning.quant.ops import OpInfo, OpKind, iter_quant_ops

__all__ = ["Alignment", "align_ops"]

_INPUT_TYPES = ("QuantStub", "Identity")


@dataclass(frozen=True)
class Alignment:
    """Op name → (float module path, call index); input op → argument name; unaligned ops (with why)."""

    matched: dict[str, tuple[str, int]]
    unmatched: dict[str, str]
    inputs: dict[str, str] = field(default_factory=dict)


def _split_call(entry: str) -> tuple[str, int]:
    """``"layer1.0.relu#1"`` → ``("layer1.0.relu", 1)``; no suffix → call 0."""
    path, sep, count = entry.rpartition("#")
    if sep and count.isdigit():
        return path, int(count)
    return entry, 0


def align_ops(prepared: nn.Module, float_model: nn.Module) -> Alignment:
    """Match every op of ``prepared`` to a float module of ``float_model`` (see the module docstring)."""
    float_modules = dict(float_model.named_modules())
    record = getattr(prepared, "prepare_record", None)
    fused = {group[0]: group for group in getattr(record, "fused", ()) if group}
    try:
        arg_names = set(inspect.signature(float_model.forward).parameters)
    except (TypeError, ValueError):
        arg_names = set()
    matched: dict[str, tuple[str, int]] = {}
    unmatched: dict[str, str] = {}
    inputs: dict[str, str] = {}
    for name, op in iter_quant_ops(prepared):
        info: OpInfo = op.op_info
        path = info.module_path
        group = fused.get(path)
        if group is not None and len(group) > 1:
            tail, call = _split_call(group[-1])
            if tail not in float_modules:
                unmatched[name] = f"fused group {' + '.join(group)}: no float module {tail!r}"
            elif info.call_index and call == 0:
                unmatched[name] = f"fused group {' + '.join(group)} of call {info.call_index}: ambiguous"
            else:
                matched[name] = (tail, call)
            continue
        if info.kind is OpKind.INPUT and path == "" and name.endswith("_quant") and name[:-6] in arg_names:
            inputs[name] = name[:-6]
            continue
        module = float_modules.get(path)
        if module is None:
            unmatched[name] = f"no float module at {path!r} (functional op or renamed module)"
            continue
        kind = type(module).__name__
        other_info = getattr(module, "op_info", None)
        same = (
            kind.lower() == info.op_type.lower()
            or (info.kind is OpKind.INPUT and kind in _INPUT_TYPES)
            or (isinstance(other_info, OpInfo) and other_info.name == info.name)
        )
        if not same:
            unmatched[name] = f"{info.op_type} op inside float module {path!r} ({kind}): not its output"
            continue
        matched[name] = (path, info.call_index)
    return Alignment(matched, unmatched, inputs)
