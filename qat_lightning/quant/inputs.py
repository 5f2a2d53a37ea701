"""Feeding a batch to a model (DESIGN "Feeding batches"), shared by calibration and the analysis layer.

``input_fn(batch)`` returns the positional args (a tuple) or the keyword args (a dict). The default,
:func:`default_input_fn`, takes a tensor as is, the first element of a tuple/list (the usual ``(x, y)``
batch) and a dict as keyword args.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["InputFn", "ModelInputs", "call_model", "default_input_fn", "normalize_inputs"]

ModelInputs = tuple[Any, ...] | dict[str, Any]
"""Positional args (tuple) or keyword args (dict) of one model call."""

InputFn = Callable[[Any], Any]


def default_input_fn(batch: Any) -> ModelInputs:
    """Apply the DESIGN's default: tensor → ``(batch,)``; tuple/list → ``(batch[0],)``; dict → kwargs."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty tuple/list batch: pass input_fn= to say what the model takes")
        return (batch[0],)
    if isinstance(batch, Mapping):
        return dict(batch)
    raise ValueError(
        f"cannot feed a batch of type {type(batch).__name__}; the default input_fn accepts a tensor, "
        "a tuple/list (first element = input) or a dict (keyword args); pass input_fn= otherwise"
    )


def normalize_inputs(value: Any) -> ModelInputs:
    """Turn what an ``input_fn`` returned (or ``example_inputs``) into a tuple or a dict."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, Mapping):
        return dict(value)
    return (value,)


def call_model(model: nn.Module, inputs: ModelInputs) -> Any:
    """Call ``model`` with positional (tuple) or keyword (dict) args.

    Raises:
        TypeError: when ``forward`` does not take a dict batch's keys as keyword args; the message names
            the keys and ``input_fn=`` (the way to say what the model takes).
    """
    if not isinstance(inputs, dict):
        return model(*inputs)
    try:
        return model(**inputs)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        keys = ", ".join(map(str, inputs))
        raise TypeError(
            f"the batch is a dict, passed to {type(model).__name__}.forward as keyword args ({keys}), "
            f"which it does not take: {err}. Pass input_fn= to say what the model takes, e.g. "
            "input_fn=lambda batch: (batch['input_ids'],)"
        ) from err
