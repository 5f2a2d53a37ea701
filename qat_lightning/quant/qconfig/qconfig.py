"""``QConfig``: what precision and calibration method one op's quant points use.

An op has up to three kinds of quant points: its inputs (``input_dtype``; ``None`` = take the producer's
output as is), its weight (gemm ops, per output channel, ``weight_dtype``) and its output
(``output_dtype``). The activation observer is chosen by name; a fixed threshold (a known physical range
of the op's output, e.g. speed in [0, 200] km/h) replaces the observer of the op's **output** quant point
with ``scale = threshold / qmax``. Input quant points always use the observer: an input's range is its
producer's output range, so pin it with a threshold on the producer op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qat_lightning.quant.checks import require_bool, require_positive_finite
from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype, qint8
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.observers import OBSERVER_NAMES, make_observer

__all__ = ["QConfig", "get_qconfig"]


def _optional_dtype(value: DtypeLike | None) -> QuantDtype | None:
    return None if value is None else parse_dtype(value)


def _hashable(value: Any) -> Any:
    """Hashable stand-in for an observer option: equal options give equal stand-ins."""
    if isinstance(value, Mapping):
        return tuple(sorted((repr(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


_CHECKED_OPTIONS: set[Any] = set()
"""``(observer, options)`` pairs already accepted (building a probe observer costs ~0.1 ms)."""


def _observer_kwargs(observer: str, kwargs: Any) -> dict[str, Any]:
    """Return ``kwargs`` as a dict after checking it against ``observer`` the way ``prepare`` will use it.

    The observer registry (``make_observer``) names the unknown options and lists the allowed ones, and
    checks each value; ``ignore_nonfinite`` (every observer's base option) must be a bool.

    Raises:
        TypeError: not a mapping, a non-str key, or a non-bool ``ignore_nonfinite``.
        ValueError: an option ``observer`` does not take, or a bad value.
    """
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"QConfig: observer_kwargs must be a mapping (option -> value), got {kwargs!r:.60}")
    options = dict(kwargs)
    bad_keys = [k for k in options if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"QConfig: observer_kwargs keys must be option names (str), got {bad_keys}")
    ignore = require_bool(
        "observer_kwargs['ignore_nonfinite']", options.get("ignore_nonfinite", False), "QConfig"
    )
    key = (observer, _hashable(options))
    if key in _CHECKED_OPTIONS:
        return options
    probe = {k: v for k, v in options.items() if k != "ignore_nonfinite"}
    try:
        make_observer(observer, ignore_nonfinite=ignore, name_for_messages="QConfig", **probe)
    except ValueError as error:
        if not str(error).startswith("unknown option"):
            raise
        raise ValueError(f"{error}; every observer also takes ignore_nonfinite (True/False)") from error
    _CHECKED_OPTIONS.add(key)
    return options


@dataclass(frozen=True)
class QConfig:
    """Quantization settings of one op.

    Attributes:
        input_dtype: dtype of the op's input quant points, ``None`` to leave inputs as produced; a tuple
            gives one dtype per input (matmul's two inputs).
        weight_dtype: dtype of the weight (gemm ops), ``None`` for no weight quantization.
        output_dtype: dtype of the output quant point, ``None`` for no output quant point.
        observer: activation calibration method (one of ``OBSERVER_NAMES`` except ``fixed``).
        observer_kwargs: extra observer arguments (``percentile``, ``averaging_constant``, ``bins``;
            ``ignore_nonfinite=True`` drops NaN/inf during calibration instead of raising).
        weight_observer: weight calibration method (per channel), ``minmax`` by default.
        fixed_threshold: when set (a finite number > 0), the scale of the op's output quant point is fixed
            to ``threshold / qmax`` of its dtype; the input quant points keep the observer.
        ch_axis: weight channel axis; ``None`` (default) = the op's own axis: the output channels (0 for
            conv / linear / embedding rows, 1 for conv-transpose). ``prepare`` rejects any other value with
            a ``ValueError`` (the int32 bias, BN folding and deployment need per-output-channel weights).
    """

    input_dtype: QuantDtype | tuple[QuantDtype | None, ...] | None = None
    weight_dtype: QuantDtype | None = qint8
    output_dtype: QuantDtype | None = qint8
    observer: str = "mse"
    observer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weight_observer: str = "minmax"
    fixed_threshold: float | None = None
    ch_axis: int | None = None

    def __post_init__(self) -> None:
        for attr in ("weight_dtype", "output_dtype"):
            object.__setattr__(self, attr, _optional_dtype(getattr(self, attr)))
        if isinstance(self.input_dtype, (tuple, list)):
            object.__setattr__(self, "input_dtype", tuple(_optional_dtype(d) for d in self.input_dtype))
        else:
            object.__setattr__(self, "input_dtype", _optional_dtype(self.input_dtype))
        allowed = [n for n in OBSERVER_NAMES if n != "fixed"]
        for attr in ("observer", "weight_observer"):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"unknown {attr} {getattr(self, attr)!r}; allowed: {', '.join(allowed)}")
        if self.fixed_threshold is not None:
            threshold = require_positive_finite("fixed_threshold", self.fixed_threshold, "QConfig")
            object.__setattr__(self, "fixed_threshold", threshold)
        if self.ch_axis is not None and (isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int)):
            raise ValueError(f"ch_axis must be an int or None, got {self.ch_axis!r}")
        object.__setattr__(self, "observer_kwargs", _observer_kwargs(self.observer, self.observer_kwargs))

    def __hash__(self) -> int:
        # the generated hash would fail on the ``observer_kwargs`` dict; hash a frozen copy of it instead
        return hash(
            (
                self.input_dtype,
                self.weight_dtype,
                self.output_dtype,
                self.observer,
                _hashable(self.observer_kwargs),
                self.weight_observer,
                self.fixed_threshold,
                self.ch_axis,
            )
        )

    def input_dtype_at(self, index: int) -> QuantDtype | None:
        """Return the dtype of input ``index`` (the last entry of a tuple repeats for further inputs)."""
        if isinstance(self.input_dtype, tuple):
            if not self.input_dtype:
                return None
            return self.input_dtype[min(index, len(self.input_dtype) - 1)]
        return self.input_dtype

    def replace(self, **changes: Any) -> QConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def activation_fake_quant(
        self, dtype: QuantDtype, name: str = "", *, output: bool = True
    ) -> FakeQuantize:
        """Build an activation quant point of this qconfig in ``dtype``.

        Args:
            dtype: the point's dtype.
            name: the node name.
            output: ``True`` for the op's output point (a ``fixed_threshold`` fixes its scale), ``False``
                for an input point (always the observer: the threshold is the op's output range).
        """
        if output and self.fixed_threshold is not None:
            fixed = {"threshold": self.fixed_threshold}
            return FakeQuantize(dtype, "fixed", observer_kwargs=fixed, name=name)
        options = dict(self.observer_kwargs)
        ignore_nonfinite = options.pop("ignore_nonfinite", False)  # an observer base option (a checked bool)
        return FakeQuantize(
            dtype, self.observer, observer_kwargs=options, ignore_nonfinite=ignore_nonfinite, name=name
        )

    def weight_fake_quant(self, num_channels: int, name: str = "") -> FakeQuantize:
        """Build a per-channel weight quant point (``weight_dtype`` must be set; ``ch_axis`` ``None`` = 0).

        ``prepare`` builds weight nodes on the op's own axis (see ``ch_axis``); this is for direct use.
        """
        if self.weight_dtype is None:
            raise ValueError(f"{name or 'this op'}: the qconfig has no weight dtype")
        return FakeQuantize(
            self.weight_dtype,
            self.weight_observer,
            ch_axis=0 if self.ch_axis is None else self.ch_axis,
            num_channels=num_channels,
            name=name,
        )


def get_qconfig(
    in_dtype: DtypeLike | None = None,
    weight_dtype: DtypeLike | None = qint8,
    out_dtype: DtypeLike | None = qint8,
    observer: str = "mse",
    fixed_scale: float | None = None,
    threshold: float | None = None,
    weight_observer: str = "minmax",
    **observer_kwargs: Any,
) -> QConfig:
    """Build a :class:`QConfig` (the seed's ``get_qconfig``).

    Args:
        in_dtype: input dtype (``None`` = as produced).
        weight_dtype: weight dtype of gemm ops.
        out_dtype: output dtype.
        observer: activation calibration method.
        fixed_scale: a fixed output scale for ``out_dtype`` (stored dtype-agnostically as the threshold
            ``fixed_scale * qmax``, so a later dtype change keeps the same range); the op's input quant
            points (``in_dtype``) keep the observer.
        threshold: the fixed output range directly (``scale = threshold / qmax``); exclusive with
            ``fixed_scale``.
        weight_observer: weight calibration method.
        **observer_kwargs: passed to the activation observer (``ignore_nonfinite=True``: drop NaN/inf
            during calibration instead of raising).

    Raises:
        TypeError: a non-number ``fixed_scale`` / ``threshold``, a non-bool ``ignore_nonfinite``.
        ValueError: for unknown names or observer options, a ``fixed_scale`` / ``threshold`` that is not a
            finite number > 0, or both ``fixed_scale`` and ``threshold``.
    """
    if fixed_scale is not None and threshold is not None:
        raise ValueError("give either fixed_scale or threshold, not both")
    if fixed_scale is not None:
        fixed_scale = require_positive_finite("fixed_scale", fixed_scale, "get_qconfig")
        out = _optional_dtype(out_dtype)
        if out is None or not out.is_integer:
            raise ValueError(
                "fixed_scale needs an integer out_dtype (qint8 or qint16); use threshold= instead"
            )
        threshold = fixed_scale * out.qmax
    return QConfig(
        input_dtype=in_dtype,
        weight_dtype=weight_dtype,
        output_dtype=out_dtype,
        observer=observer,
        observer_kwargs=observer_kwargs,
        weight_observer=weight_observer,
        fixed_threshold=threshold,
    )
