"""The quant node: :class:`FakeQuantize`, its :class:`FakeQuantState`, and :class:`FakeCast`.

A ``FakeQuantize`` owns one observer and a ``scale`` buffer. Its behaviour is set by its state:

* ``QAT``: fake quant with a straight-through gradient. Activation scales follow the data with a
  moving average of the batch ``|x|`` max (``scale += c * (amax / qmax - scale)``, ``c =
  qat_averaging_constant``), starting from the calibrated scale: each batch is fake-quantized with the
  scale as it stands and then moves it, so the fused kernel takes the batch's range in the same pass
  (torch.ao's ``FakeQuantize`` observes first; with ``c = 0.01`` the two scales differ by 1 % of the
  gap between the batch max and the average). Before the first scale, and with ``c = 1`` (the scale is
  each batch's own max), the batch is observed first. Weight scales are the per-channel ``|w|`` max of
  the current weights. Fixed scales never move.
* ``CALIBRATION``: the observer collects statistics; values pass through unchanged.
* ``VALIDATION``: fake quant with the frozen scale; nothing is observed.
* ``FLOAT``: identity, one attribute test.

All state that must survive a checkpoint is in buffers with shapes fixed at construction: ``scale``,
``dtype_code`` (so a mixed-precision change of dtype is restored), ``scale_fixed`` and the observer's
statistics. The scale is computed lazily from the statistics (histogram methods cost milliseconds),
on first use after calibration, on access of ``.scale``, on ``state_dict`` and on a dtype change.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from qat_lightning.quant.backends.overwrite import overwrite_target
from qat_lightning.quant.backends.qat_weight import fused_qat_weight
from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype
from qat_lightning.quant.nodes.functional import _FakeQuantizeSTE, _scale_view, fake_cast
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch
from qat_lightning.quant.observers import SCALE_EPS, Observer, make_observer

_SCALE_EPS_F32 = float(torch.tensor(SCALE_EPS, dtype=torch.float32))
"""``SCALE_EPS`` rounded to float32, as ``clamp_min_`` applies it to a float32 scale."""

__all__ = [
    "FakeQuantState",
    "FakeQuantize",
    "FakeCast",
    "set_fake_quantize",
    "fake_quant_state",
    "fake_quant_disabled",
    "iter_fake_quantize",
]


class FakeQuantState(str, enum.Enum):
    """What a quant node does on ``forward`` (the seed's ``FakeQuantState``)."""

    QAT = "qat"
    CALIBRATION = "calibration"
    VALIDATION = "validation"
    FLOAT = "float"

    @classmethod
    def parse(cls, value: FakeQuantState | str) -> FakeQuantState:
        """Accept a state or its name (case-insensitive); raise listing the allowed names."""
        if isinstance(value, FakeQuantState):
            return value
        if isinstance(value, str):
            key = value.strip().lower().lstrip("_")
            for state in cls:
                if key in (state.value, state.name.lower()):
                    return state
        raise ValueError(f"unknown FakeQuantState {value!r}; allowed: {', '.join(s.name for s in cls)}")


def _set_flag(module: nn.Module, name: str, value: bool) -> None:
    """Set a plain attribute without ``nn.Module.__setattr__``'s checks (a per-call flag on the hot path)."""
    object.__setattr__(module, name, value)


class FakeQuantize(nn.Module):
    """One quant point: observer + scale + fake quant (or fake cast for float16).

    Args:
        dtype: ``qint8``, ``qint16``, ``float16`` (fake cast) or ``float32`` (untouched).
        observer: calibration method name, see ``qat_lightning.quant.observers.OBSERVER_NAMES``.
        ch_axis: channel axis for per-channel (weight) quantization, ``None`` for per-tensor.
        num_channels: size of ``ch_axis``; required when ``ch_axis`` is set (buffer shapes are fixed).
        observer_kwargs: extra arguments of the observer (``percentile``, ``averaging_constant``,
            ``threshold`` for ``observer="fixed"``, ...).
        qat_averaging_constant: weight of a new batch in the QAT moving average of activation scales,
            in (0, 1].
        ignore_nonfinite: skip NaN/inf during calibration instead of raising.
        name: op name used in messages (set by ``prepare``).
    """

    def __init__(
        self,
        dtype: DtypeLike = "qint8",
        observer: str = "minmax",
        ch_axis: int | None = None,
        num_channels: int | None = None,
        observer_kwargs: Mapping[str, Any] | None = None,
        qat_averaging_constant: float = 0.01,
        ignore_nonfinite: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if not 0.0 < qat_averaging_constant <= 1.0:
            raise ValueError(f"qat_averaging_constant must be in (0, 1], got {qat_averaging_constant}")
        self.observer: Observer = make_observer(
            observer,
            ch_axis=ch_axis,
            num_channels=num_channels,
            ignore_nonfinite=ignore_nonfinite,
            name_for_messages=name,
            **dict(observer_kwargs or {}),
        )
        self.observer_name = observer
        self.ch_axis = ch_axis
        self.qat_averaging_constant = qat_averaging_constant
        self._name = name
        self._dtype = parse_dtype(dtype)
        scale_shape = () if ch_axis is None else (int(num_channels or 1),)
        self.register_buffer("scale", torch.ones(scale_shape))
        self.register_buffer("dtype_code", torch.tensor(self._dtype.code, dtype=torch.long))
        self.register_buffer("scale_fixed", torch.tensor(observer == "fixed"))
        self.register_buffer("scale_ready", torch.tensor(False))
        self.state = FakeQuantState.QAT
        self._dirty = observer == "fixed"
        self._relu_fused = False  # set by forward_relu for the duration of one call
        self._overwrite = False  # set by forward_owned for the duration of one call
        self._fixed = observer == "fixed"  # python mirrors of the flag buffers: no tensor read per forward
        self._ready = False

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """Op name used in messages and reports."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        self.observer.name = value

    @property
    def dtype(self) -> QuantDtype:
        """Current precision. Setting it recomputes the scale from the kept statistics."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: DtypeLike) -> None:
        new = parse_dtype(value)
        old, self._dtype = self._dtype, new
        self.dtype_code.fill_(new.code)
        if not new.is_integer or new == old:
            return
        if self.observer.has_data or self.observer_name == "fixed":
            self._dirty = True
            self.refresh_scale()
        elif old.is_integer and self._ready:
            self._buffers["scale"].mul_(old.qmax / new.qmax)

    @property
    def is_fixed(self) -> bool:
        """Whether the scale is pinned (fixed-scale observer or ``fix_scale()``)."""
        return self._fixed

    def __getattr__(self, name: str) -> Any:
        if name == "scale" and self.__dict__.get("_dirty", False):
            self.refresh_scale()
        return super().__getattr__(name)

    # ------------------------------------------------------------------ scale management
    def refresh_scale(self) -> None:
        """Recompute ``scale`` from the observer statistics if they changed since the last time."""
        self._dirty = False
        if not self._dtype.is_integer:
            return
        if not (self.observer.has_data or self.observer_name == "fixed"):
            return
        self._copy_scale(self.observer.compute_scale(self._dtype))

    def _use_default_scale(self) -> None:
        """Give a node used before any data the observer's default scale (it warns, naming the node), once."""
        if not self.__dict__.get("_defaulted", False):
            self._defaulted = True
            scale = self._buffers["scale"]
            default = self.observer.compute_scale(self._dtype)
            scale.copy_(default.to(scale.device, scale.dtype).reshape(scale.shape))

    def _copy_scale(self, new: Tensor) -> None:
        scale = self._buffers["scale"]
        scale.copy_(new.to(scale.device, scale.dtype).reshape(scale.shape))
        self._mark_ready()

    def _mark_ready(self) -> None:
        if not self._ready:
            self._ready = True
            self.scale_ready.fill_(True)

    def fix_scale(self, fixed: bool = True) -> None:
        """Pin (or release) the current scale: QAT and calibration then leave it unchanged."""
        if self._dirty:
            self.refresh_scale()
        self._fixed = fixed or self.observer_name == "fixed"
        self.scale_fixed.fill_(self._fixed)

    def _qat_update(self, x: Tensor) -> None:
        """Observe ``x`` and move the scale (QAT state): the documented moving average, or the weight max."""
        if self._dirty:
            self.refresh_scale()
        if self._fixed:
            return
        scale = self._buffers["scale"]
        amax_f = self.observer._update_range_fused(x.detach())
        if amax_f is not None:
            self._move_scale(amax_f)
            return
        amax = self.observer.update_range(x.detach())
        batch_scale = (amax.float() / self._dtype.qmax).clamp_min_(SCALE_EPS)
        if self.ch_axis is not None or not self._ready:
            scale.copy_(batch_scale.reshape(scale.shape))
            self._mark_ready()
        else:
            scale.lerp_(batch_scale.reshape(scale.shape), self.qat_averaging_constant)

    def _averages(self) -> bool:
        """Whether QAT moves this scale by a moving average (per tensor, averaging constant below 1)."""
        return self.ch_axis is None and self.qat_averaging_constant < 1.0

    def _move_scale(self, amax: float) -> None:
        """Move a per-tensor scale with the batch ``max |x|`` ``amax`` (float32 scale from Python floats)."""
        batch_scale = torch.tensor(max(amax / self._dtype.qmax, _SCALE_EPS_F32))
        if not self._ready:
            self._buffers["scale"].copy_(batch_scale)
            self._mark_ready()
        else:
            self._buffers["scale"].lerp_(batch_scale, self.qat_averaging_constant)

    def _quantize_then_observe(self, x: Tensor, relu: bool) -> Tensor:
        """QAT activation: fake-quantize with the scale as it stands, then move it with the batch's range.

        With the fused kernels the range comes from the same pass over ``x`` (one read of the batch instead
        of two); otherwise, or when the batch holds NaN/inf, the observer then sees the batch as usual.
        """
        dtype, seen = self._dtype, []
        target = overwrite_target(x) if self._overwrite else None  # x, or the whole result x reshapes
        src = x if target is None else target
        out = _FakeQuantizeSTE.apply(
            src, self._buffers["scale"], dtype.qmin, dtype.qmax, relu, seen, target is not None
        )
        if src is not x:
            out = out.view(x.shape)
        amax = self.observer._record_range(*seen) if seen else None
        if amax is None:
            self._qat_update(x)
        else:
            self._move_scale(amax)
        return out

    _qat_weight_fused = fused_qat_weight  # QAT per-channel weight in one kernel (quant/qat_weight.py)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_weight_out", None)  # scratch memory: not pickled, not deep-copied
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Observe and/or fake-quantize ``x`` according to ``state`` and the global switches."""
        state = self.state
        if state is FakeQuantState.FLOAT or not GlobalFakeQuantSwitch._enabled:
            return x
        if state is FakeQuantState.CALIBRATION:
            if not self._fixed or self.observer_name == "fixed":
                self.observer(x.detach())
                self._dirty = True
            return x
        dtype = self._dtype
        if not dtype.is_integer:
            if dtype.is_float16 and FakeCastSwitch._enabled:
                return fake_cast(x)
            return x
        return self._fake_quantize(x, relu=self._relu_fused)

    def forward_relu(self, x: Tensor) -> Tensor:
        """``self(F.relu(x))`` (same values and gradients; ``x`` is overwritten with ``relu(x)`` in place).

        In QAT and VALIDATION state with an integer dtype the ReLU is fused into the fake quant: the ReLU
        runs in place without autograd and its gradient (``x > 0``) joins the fake quant's mask, so ReLU's
        output is not kept for backward (one activation less per fused conv/linear + ReLU).
        """
        state = self.state
        if (
            state in (FakeQuantState.QAT, FakeQuantState.VALIDATION)
            and GlobalFakeQuantSwitch._enabled
            and self._dtype.is_integer
        ):
            with torch.no_grad():
                x.relu_()
            _set_flag(self, "_relu_fused", True)  # through __call__, so forward hooks on this node still run
            try:
                return self.forward_owned(x)
            finally:
                _set_flag(self, "_relu_fused", False)
        return self(torch.relu_(x))

    def forward_owned(self, x: Tensor) -> Tensor:
        """``self(x)`` for a tensor only the caller holds (an op's fresh result): QAT may overwrite ``x``.

        In QAT, when no forward hook could see ``x`` and autograd kept nothing aliasing it
        (:func:`~..backends.overwrite.overwrite_target`), the fused kernel writes the result into
        ``x``'s memory instead of a new buffer. Same values and gradients as ``self(x)``.
        """
        if self.state is FakeQuantState.QAT and not (
            self._forward_hooks
            or self._forward_pre_hooks
            or _nn_module._global_forward_hooks
            or _nn_module._global_forward_pre_hooks
        ):
            _set_flag(self, "_overwrite", True)
            try:
                return self(x)
            finally:
                _set_flag(self, "_overwrite", False)
        return self(x)

    def _fake_quantize(self, x: Tensor, relu: bool) -> Tensor:
        """QAT / VALIDATION: update (QAT) or refresh the scale, then fake-quantize."""
        dtype = self._dtype
        if self.state is FakeQuantState.QAT:
            if self._dirty:
                self.refresh_scale()
            if self._ready and not self._fixed and self._averages():
                return self._quantize_then_observe(x, relu)
            self._qat_update(x)
        elif self._dirty or not self._ready:
            self.refresh_scale()
            if not self._ready:
                self._use_default_scale()
        scale = _scale_view(self._buffers["scale"], x, self.ch_axis)
        return _FakeQuantizeSTE.apply(x, scale, dtype.qmin, dtype.qmax, relu)

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self._dirty:
            self.refresh_scale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._dtype = parse_dtype(int(self.dtype_code))
        self._fixed = bool(self.scale_fixed)
        self._ready = bool(self.scale_ready)
        self._dirty = False

    def extra_repr(self) -> str:
        """Return dtype, observer, channel axis and state for ``repr``."""
        axis = "" if self.ch_axis is None else f", ch_axis={self.ch_axis}"
        return f"dtype={self._dtype}, observer={self.observer_name}{axis}, state={self.state.name}"


class FakeCast(nn.Module):
    """A float16 quant point (round trip through fp16, saturating at ±65504), and the global switch.

    ``FakeCast.disable()`` / ``FakeCast.enable()`` turn every float16 node off/on, also from inside a
    ``forward`` (the seed's partial-quantization idiom).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Fake-cast ``x`` to float16 precision when fake cast is enabled."""
        return fake_cast(x) if FakeCastSwitch._enabled else x

    @staticmethod
    def enable() -> None:
        """Turn float16 fake cast on for every node."""
        FakeCastSwitch.enable()

    @staticmethod
    def disable() -> None:
        """Turn float16 fake cast off for every node."""
        FakeCastSwitch.disable()

    @staticmethod
    def enabled() -> bool:
        """Whether float16 fake cast is on."""
        return FakeCastSwitch.enabled()


def iter_fake_quantize(module: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """Yield ``(qualified name, node)`` for every :class:`FakeQuantize` in ``module`` (itself included)."""
    for name, sub in module.named_modules():
        if isinstance(sub, FakeQuantize):
            yield name, sub


def set_fake_quantize(module: nn.Module, state: FakeQuantState | str) -> None:
    """Put every quant node in ``module`` into ``state``: ``QAT``, ``CALIBRATION``, ``VALIDATION``, ``FLOAT``.

    Raises:
        ValueError: for an unknown state, before anything is changed.
    """
    target = FakeQuantState.parse(state)
    for _, node in iter_fake_quantize(module):
        node.state = target


@contextmanager
def fake_quant_state(module: nn.Module, state: FakeQuantState | str) -> Iterator[nn.Module]:
    """Temporarily put every quant node of ``module`` into ``state``; always restore each node's own state."""
    target = FakeQuantState.parse(state)
    saved = [(node, node.state) for _, node in iter_fake_quantize(module)]
    try:
        for node, _ in saved:
            node.state = target
        yield module
    finally:
        for node, previous in saved:
            node.state = previous


def fake_quant_disabled(module: nn.Module) -> Any:
    """Context manager running ``module`` in float (quant nodes in FLOAT), restoring the states after."""
    return fake_quant_state(module, FakeQuantState.FLOAT)
