"""The original float values of the parameters a post-training step overwrote on a prepared model.

AdaRound writes its rounded weights into the float weights and bias correction shifts the biases (what a
following QAT starts from), so afterwards the prepared model with its fake quant off is no longer the float
model. Every write goes through :class:`~qat_lightning.ptq.gemm_view.GemmView`, which records, before the
first one, the value it overwrites:

* **where**: a plain attribute ``ptq_original`` (``{parameter name: FloatRecord}``) of the module owning
  the parameter (the ``nn.Linear`` / ``nn.Conv*``, or the ``BatchNorm`` of a folded conv-bn, whose beta is
  the op's bias). It is not in the ``state_dict`` (the keys stay those of a freshly prepared model, so
  checkpoints keep loading strictly); ``deepcopy`` and pickling keep it.
* **checkpoints**: :func:`float_record_state` / :func:`load_float_record_state` give / take it as plain
  tensors and strings. The PTQ callbacks write it under ``checkpoint[PTQ_CHECKPOINT_KEY][submodule]`` and
  the app loads it back with a calibration checkpoint.
* **validity**: a record keeps a fingerprint of the value the step left. Once the parameter has changed
  since (QAT trained it, the user wrote it, a cast), the record no longer describes the model and is
  ignored: the float path is then the current parameter, as for a model no PTQ step touched.
* **a second run** of a step first writes the recorded values back (:func:`restore`), so it starts again
  from the original float parameters instead of stacking on its first result.

:func:`qat_lightning.ptq.float_reference` is what uses the records.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PTQ_CHECKPOINT_KEY",
    "FloatRecord",
    "float_record_state",
    "live_record",
    "load_float_record_state",
    "mark_written",
    "original_float_parameters",
    "remember",
    "restore",
]

PTQ_CHECKPOINT_KEY = "qat_lightning_ptq"
"""Checkpoint key of the records: ``{submodule: float_record_state(submodule)}``."""

_ATTR = "ptq_original"


@dataclass
class FloatRecord:
    """The original float value of one parameter a post-training step overwrote.

    Attributes:
        original: the value before the first post-training write.
        written: ``[sum, sum of squares]`` (float64) of the value the last step left.
        dtype: for a weight, the quant dtype it was rounded for (``""`` for a bias).
    """

    original: Tensor
    written: Tensor
    dtype: str = ""


def _fingerprint(t: Tensor) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor even when a caller is in inference mode
        d = t.detach()
        d = d.float() if d.device.type == "mps" else d.double()  # MPS has no float64
        return torch.stack([d.sum(), d.square().sum()])


def _param(owner: nn.Module, name: str) -> Tensor | None:
    value = owner._parameters.get(name)
    return value if isinstance(value, Tensor) else None


def _records(owner: nn.Module) -> dict[str, FloatRecord]:
    return owner.__dict__.get(_ATTR) or {}


def live_record(owner: nn.Module, name: str) -> FloatRecord | None:
    """Return the record of ``owner.<name>`` while the parameter holds what the step left, else ``None``."""
    rec, param = _records(owner).get(name), _param(owner, name)
    if rec is None or param is None or param.shape != rec.original.shape:
        return None
    (s_now, q_now), (s_then, q_then) = _fingerprint(param).tolist(), rec.written.tolist()
    rel = 1e-6 if param.device.type == "mps" else 1e-9
    q_tol = rel * max(q_then, 1e-30)
    s_tol = rel * (max(q_then, 1e-30) * param.numel()) ** 0.5  # |sum| <= sqrt(n * sum of squares)
    return rec if abs(q_now - q_then) <= q_tol and abs(s_now - s_then) <= s_tol else None


def remember(owner: nn.Module, name: str, dtype: str = "") -> None:
    """Record ``owner.<name>``'s value as the original before a step writes it (kept if already recorded)."""
    param = _param(owner, name)
    if param is None:
        raise ValueError(f"{type(owner).__name__} has no parameter {name!r} to record")
    records = owner.__dict__.setdefault(_ATTR, {})
    rec = live_record(owner, name)
    if rec is None:
        with torch.inference_mode(False):  # the record outlives an inference-mode caller
            original = param.detach().clone()
        records[name] = FloatRecord(original, _fingerprint(param), dtype)
    elif dtype:
        rec.dtype = dtype


def mark_written(owner: nn.Module, name: str) -> None:
    """Note the value a step just wrote into ``owner.<name>`` (its record stays valid while it is kept)."""
    param = _param(owner, name)
    rec = _records(owner).get(name)
    if param is not None and rec is not None:
        rec.written = _fingerprint(param)


@torch.no_grad()
def restore(owner: nn.Module, name: str) -> bool:
    """Write a valid record's original back into ``owner.<name>`` and drop the record.

    Returns whether a value was written back (an outdated record is dropped only).
    """
    rec = live_record(owner, name)
    _records(owner).pop(name, None)
    if rec is None:
        return False
    param = _param(owner, name)
    assert param is not None  # live_record checked it
    param.copy_(rec.original)
    return True


def _live(model: nn.Module) -> Iterator[tuple[str, FloatRecord]]:
    for path, module in model.named_modules():
        for name in list(_records(module)):
            rec = live_record(module, name)
            if rec is not None:
                yield (f"{path}.{name}" if path else name), rec


def original_float_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Return the original float values of the parameters post-training steps changed (valid records).

    Keys are the names of ``model.named_parameters()``: ``model.load_state_dict(originals, strict=False)``
    on a copy gives the float model back.
    """
    return {key: rec.original for key, rec in _live(model)}


def float_record_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Return the valid records of ``model`` as plain data (a checkpoint's): ``{parameter name: {...}}``.

    The tensors are the records' own (not copies): broadcasting them in place updates the records.
    """
    return {k: {"original": r.original, "written": r.written, "dtype": r.dtype} for k, r in _live(model)}


def load_float_record_state(model: nn.Module, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Attach records saved by :func:`float_record_state` to ``model`` (the same prepared network).

    Raises:
        ValueError: when a recorded parameter does not exist in ``model`` or has another shape.
    """
    for key, item in state.items():
        path, _, name = key.rpartition(".")
        try:
            owner = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"float record {key!r}: no module {path!r} in the model") from err
        param = _param(owner, name)
        original = item["original"]
        if param is None or param.shape != original.shape:
            shape = tuple(original.shape)
            raise ValueError(f"float record {key!r}: the model has no parameter of shape {shape}")
        with torch.inference_mode(False):
            rec = FloatRecord(
                original.detach().to(param.device, param.dtype).clone(),
                torch.as_tensor(item["written"]).to(param.device, _fingerprint(param).dtype).clone(),
                str(item.get("dtype", "")),
            )
        owner.__dict__.setdefault(_ATTR, {})[name] = rec
