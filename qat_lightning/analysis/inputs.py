"""Model I/O for the analysis layer: batches → call arguments, per-sample slicing, output flattening.

Feeding a batch (DESIGN "Feeding batches"): ``input_fn(batch)`` returns the positional args (a tuple) or
the keyword args (a dict). :func:`default_input_fn` takes a tensor as is, the first element of a
tuple/list (the usual ``(x, y)`` batch) and a dict as keyword args.

Samples: the batch dimension is dim 0 of every tensor argument whose dim 0 equals the batch size (the
dim 0 of the first tensor argument). Non-tensor arguments and tensors of another size are passed as they
are to every sample.

Output names follow the seed: a single tensor is ``0``; the elements of a tuple/list are ``0-0``, ``0-1``
(nested: ``0-1-0``); dict entries are named by their key (nested under a tuple: ``0-1-cls``; a dict
returned at top level: ``cls``). Non-tensor leaves are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from qat_lightning.analysis.checks import check_count
from qat_lightning.quant.inputs import InputFn, ModelInputs, call_model, default_input_fn, normalize_inputs
from qat_lightning.quant.outputs import flatten_outputs

__all__ = [
    "ModelInputs",
    "InputFn",
    "default_input_fn",
    "normalize_inputs",
    "call_model",
    "iter_batches",
    "batch_size_of",
    "select_samples",
    "concat_samples",
    "flatten_outputs",
    "map_tensors",
]


def iter_batches(
    dataloader: Iterable[Any], num_steps: int | None = None, input_fn: InputFn | None = None
) -> Iterator[ModelInputs]:
    """Return an iterator over the model inputs of the first ``num_steps`` batches (all when ``None``).

    Raises:
        TypeError: when ``num_steps`` is not an int (or ``None``), or ``input_fn`` is not callable.
        ValueError: when ``num_steps`` < 1 (checked now, not at the first batch).
    """
    check_count("num_steps", num_steps, allow_none=True)
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"input_fn must be a callable batch -> model inputs, got {type(input_fn).__name__}")
    fn = input_fn or default_input_fn
    return (normalize_inputs(fn(batch)) for batch in islice(dataloader, num_steps))


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


def batch_size_of(inputs: ModelInputs) -> int:
    """Dim 0 of the first tensor argument with at least one dimension.

    Raises:
        ValueError: when no argument is a tensor with a batch dimension.
    """
    for t in _tensors(inputs):
        if t.dim() >= 1:
            return int(t.shape[0])
    raise ValueError("the model inputs hold no tensor with a batch dimension (dim 0)")


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict structure, keeping the structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def select_samples(inputs: ModelInputs, index: int | slice | Tensor, batch_size: int) -> ModelInputs:
    """Return the inputs of some samples: tensors whose dim 0 is ``batch_size`` are indexed along it.

    An int index keeps the batch dimension (size 1), so the result can be fed to the model as is.
    """
    if isinstance(index, int):
        index = slice(index, index + 1)

    def pick(t: Tensor) -> Tensor:
        if t.dim() >= 1 and t.shape[0] == batch_size:
            return t[index].detach().clone()
        return t

    return map_tensors(inputs, pick)


def concat_samples(samples: list[ModelInputs]) -> ModelInputs:
    """Stack several sample inputs (each with batch size 1) back into one batch along dim 0.

    Tensors whose dim 0 is 1 are concatenated; everything else is taken from the first sample.

    Raises:
        ValueError: for an empty list, or samples whose structures or shapes do not match.
    """
    if not samples:
        raise ValueError("no samples to concatenate")
    first = samples[0]

    def merge(parts: list[Any]) -> Any:
        head = parts[0]
        if isinstance(head, Tensor):
            if head.dim() >= 1 and head.shape[0] == 1:
                try:
                    return torch.cat(parts, dim=0)
                except RuntimeError as err:
                    raise ValueError(
                        f"bad-case samples have different shapes and cannot be batched: {err}"
                    ) from err
            return head
        if isinstance(head, tuple) and hasattr(head, "_fields"):
            return type(head)(*(merge([p[i] for p in parts]) for i in range(len(head))))
        if isinstance(head, (tuple, list)):
            return type(head)(merge([p[i] for p in parts]) for i in range(len(head)))
        if isinstance(head, Mapping):
            return {k: merge([p[k] for p in parts]) for k in head}
        return head

    return merge(list(samples)) if len(samples) > 1 else first
