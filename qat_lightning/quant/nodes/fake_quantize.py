"""The quant node: :class:`FakeQuantize`, its :class:`FakeQuantState`, and :class:`FakeCast`.

A ``FakeQuantize`` owns one observer and a float32 ``scale`` buffer. Its behaviour is set by its state:

* ``QAT``: fake quant with a straight-through gradient. How the scale moves is the node's ``scale_mode``
  (:data:`SCALE_MODES`, set for a whole model by :func:`set_qat_scales`), from the calibrated scale:

  - ``moving`` (default): activation scales follow the data with a moving average of the batch ``|x|``
    max (``scale += c * (amax / qmax - scale)``, ``c = qat_averaging_constant``); each batch is
    fake-quantized with the scale as it stands and then moves it (torch.ao's ``FakeQuantize`` observes
    first; with ``c = 0.01`` the two differ by 1 % of the gap). Before the first scale, and with ``c = 1``,
    the batch is observed first. Weight (per-channel) scales are the per-channel ``|w|`` max of the weights.
  - ``fixed``: the scale never moves, even in ``CALIBRATION`` (a dtype change: the statistics' scale).
  - ``learned``: per-tensor scales are a parameter ``scale_param`` trained by the LSQ gradient
    (:func:`~qat_lightning.quant.nodes.functional.lsq_quantize`); per-channel scales follow the weights.
* ``CALIBRATION``: the observer collects statistics; values pass through unchanged. ``VALIDATION``: fake
  quant with the frozen scale; nothing is observed. ``FLOAT``: identity.

Device-neutral: no forward reads a tensor back to the host; moving average, first batch and non-finite
cases are tensor ops, so a GPU step never syncs and ``torch.compile(fullgraph=True)`` / ``torch.export``
trace it. Once a scale exists (a python mirror of ``scale_ready``, set outside the forward), the QAT
quantize does not depend on the batch range (the opt-in ``cpu_kernels`` backend runs that whole QAT step in
C in eager mode). Scales come from the observer statistics outside the forward, once it has seen new
batches in ``CALIBRATION`` (on leaving it, ``.scale``, ``state_dict``), and on a dtype change. Half
precision: float32 math, returned in its own dtype.

Checkpointed state is in buffers of shapes fixed at construction: ``scale``, ``dtype_code`` (a changed dtype
is restored), ``scale_fixed``, ``scale_ready``, the observer's statistics (+ ``scale_param`` if learned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qat_lightning.quant.checks import require_bool, require_module, require_number_in
from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, parse_dtype
from qat_lightning.quant.nodes.fake_cast import FakeCast
from qat_lightning.quant.nodes.functional import fake_cast, lsq_quantize, quantize_tensor
from qat_lightning.quant.nodes.states import FakeQuantState
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch
from qat_lightning.quant.observers import DEFAULT_SCALE, SCALE_EPS, Observer, make_observer
from qat_lightning.quant.observers.base import apply_keeping_float32

__all__ = ["SCALE_MODES", "FakeQuantState", "FakeQuantize", "FakeCast", "set_fake_quantize",
           "fake_quant_state", "fake_quant_disabled", "iter_fake_quantize"]  # fmt: skip

_OBSERVING_BACKEND_HOOK: list[Callable[[FakeQuantize, Tensor], Tensor | None]] = []
"""The selected opt-in backend's QAT step of a per-tensor node with a scale (see ``quant.backends``)."""

SCALE_MODES: tuple[str, ...] = ("moving", "fixed", "learned")
"""How QAT moves a scale: moving average of the data / pinned / learned (LSQ)."""


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
        ignore_nonfinite: skip NaN/inf during calibration instead of raising (a bool; else TypeError).
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
        who = f"FakeQuantize {name!r}"
        require_number_in("qat_averaging_constant", qat_averaging_constant, who, low=0, high=1)
        require_bool("ignore_nonfinite", ignore_nonfinite, who)  # a string such as "no" is not False
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
        self.qat_averaging_constant = float(qat_averaging_constant)
        self._name = name
        self._dtype = parse_dtype(dtype)
        scale_shape = () if ch_axis is None else (int(num_channels or 1),)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32))
        self.register_buffer("dtype_code", torch.tensor(self._dtype.code, dtype=torch.long))
        self.register_buffer("scale_fixed", torch.tensor(observer == "fixed"))
        self.register_buffer("scale_ready", torch.tensor(False))
        self._state = FakeQuantState.QAT
        self._fixed = observer == "fixed"  # python mirrors of the flag buffers: read by the forward
        self._scale_mode = "fixed" if self._fixed else "moving"
        self._dirty = False
        self._scale_known = False  # python mirror of ``scale_ready`` (updated outside the forward)
        if self._fixed:
            self.refresh_scale()

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
    def state(self) -> FakeQuantState:
        """What ``forward`` does. Leaving ``CALIBRATION`` after new batches recomputes an unpinned scale."""
        return self._state

    @state.setter
    def state(self, value: FakeQuantState | str) -> None:
        new = FakeQuantState.parse(value)
        if self.__dict__.get("_state", new) is not new:
            self.observer.check_finite()  # NaN/inf counted by a sync-free forward: raise now
        self.__dict__["_state"] = new
        meta = self._buffers["scale"].is_meta
        if new is FakeQuantState.CALIBRATION:
            if self.calibrates and not meta:  # a compiled forward sets no flag: count the batches instead
                self.__dict__.setdefault("_batches_before", self.observer.batches_seen())
            return
        if meta:
            self.__dict__["_dirty"] = False
            return  # a shape-only copy: nothing to compute
        if self._stale():
            self.refresh_scale()
        self.__dict__.pop("_batches_before", None)
        self.__dict__["_scale_known"] = bool(self.scale_ready)  # a QAT forward may have set it
        if new is FakeQuantState.VALIDATION and self._dtype.is_integer and not self._scale_known:
            self._use_default_scale()

    @property
    def dtype(self) -> QuantDtype:
        """Current precision; setting it recomputes the scale from the statistics (a pinned one too)."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: DtypeLike) -> None:
        new = parse_dtype(value)
        old, self._dtype = self._dtype, new
        self.dtype_code.fill_(new.code)
        if not new.is_integer or new == old or self._buffers["scale"].is_meta:  # meta: a shape-only copy
            return
        if self.observer.has_data or self.observer_name == "fixed":
            self._dirty = True
            self.refresh_scale()
        elif old.is_integer and bool(self.scale_ready):
            self._buffers["scale"].mul_(old.qmax / new.qmax)
        if self._scale_mode == "learned":
            self.scale_param.data.copy_(self._buffers["scale"])

    @property
    def calibrates(self) -> bool:
        """Whether ``CALIBRATION`` updates the statistics and, leaving it, the scale (not a pinned scale)."""
        return not self._fixed or self.observer_name == "fixed"

    def _stale(self) -> bool:
        """Whether the scale lags: an eager calibration forward, or new batches since ``CALIBRATION``."""
        before, dirty = self.__dict__.get("_batches_before"), self.__dict__.get("_dirty", False)
        return dirty or (before is not None and before != self.observer.batches_seen())

    @property
    def is_fixed(self) -> bool:
        """Whether the scale is pinned (fixed-scale observer, ``scale_mode="fixed"`` or ``fix_scale()``)."""
        return self._fixed

    @property
    def scale_mode(self) -> str:
        """How QAT moves the scale: one of :data:`SCALE_MODES` (see the module docstring)."""
        return self._scale_mode

    @scale_mode.setter
    def scale_mode(self, mode: str) -> None:
        if mode not in SCALE_MODES:
            raise ValueError(
                f"unknown scale mode {mode!r} for {self._name!r}; allowed: {', '.join(SCALE_MODES)}"
            )
        if mode == "learned" and (self.ch_axis is not None or not self._dtype.is_integer):
            raise ValueError(
                f"scale_mode='learned' needs a per-tensor integer node; {self._name!r} is "
                f"{'per channel' if self.ch_axis is not None else self._dtype}"
            )
        if self._stale():
            self.refresh_scale()
        if mode == "learned":  # start from the current (calibrated) scale
            start = self._buffers["scale"].detach().clone()
            if "scale_param" in self._parameters:
                self.scale_param.data.copy_(start)
            else:
                self.scale_param = nn.Parameter(start)
        elif "scale_param" in self._parameters:
            del self._parameters["scale_param"]
        self._fixed = mode == "fixed" or self.observer_name == "fixed"
        self.scale_fixed.fill_(self._fixed)
        self._scale_mode = "fixed" if self._fixed else mode

    def __getattr__(self, name: str) -> Any:
        if name != "scale" or "_scale_mode" not in self.__dict__:
            return super().__getattr__(name)
        if self._stale():
            self.refresh_scale()
        return self._current_scale()  # what it quantizes with now: a learned scale may have moved

    # ------------------------------------------------------------------ scale management
    def refresh_scale(self) -> None:
        """Recompute ``scale`` from the observer statistics (outside the forward; may read the host).

        Raises:
            ValueError: when the observer saw NaN/inf and does not ignore them.
        """
        self._dirty = False
        if "_batches_before" in self.__dict__:
            self._batches_before = self.observer.batches_seen()
        if not self._dtype.is_integer:
            return
        self.observer.check_finite()
        if not (self.observer.has_data or self.observer_name == "fixed"):
            return
        scale = self._buffers["scale"]
        scale.copy_(
            self.observer.compute_scale(self._dtype).to(scale.device, scale.dtype).reshape(scale.shape)
        )
        self.scale_ready.fill_(True)
        self._scale_known = True
        if self._scale_mode == "learned":
            self.scale_param.data.copy_(scale)

    def _use_default_scale(self) -> None:
        """Give a node without data the default scale; it warns (naming the node) when it first runs."""
        self._buffers["scale"].fill_(DEFAULT_SCALE)
        self.__dict__["_warn_default"] = True

    def _warn_default_scale(self) -> None:
        self.__dict__["_warn_default"] = False
        self.observer.compute_scale(self._dtype)  # warns: seen no data, DEFAULT_SCALE

    def fix_scale(self, fixed: bool = True) -> None:
        """Pin (or release to ``moving``) the current scale: QAT and calibration then leave it unchanged."""
        self.scale_mode = "fixed" if fixed else "moving"

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Observe and/or fake-quantize ``x`` according to ``state`` and the global switches."""
        state = self._state
        if state is FakeQuantState.FLOAT or not GlobalFakeQuantSwitch._enabled:
            return x
        if state is FakeQuantState.CALIBRATION:
            if self.calibrates:
                self.observer(x.detach())
                if not torch.compiler.is_compiling():
                    self.__dict__["_dirty"] = True
            return x
        dtype = self._dtype
        if not dtype.is_integer:
            if dtype.is_float16 and FakeCastSwitch._enabled:
                return fake_cast(x)
            return x
        if state is FakeQuantState.QAT and not self._fixed:
            return self._qat_forward(x)
        if self.__dict__.get("_warn_default", False) and not torch.compiler.is_compiling():
            self._warn_default_scale()
        return quantize_tensor(x, self._current_scale(), dtype.qmin, dtype.qmax, self.ch_axis)

    def _current_scale(self) -> Tensor:
        """Return the scale the node quantizes with (the learned parameter's value in ``learned`` mode)."""
        scale = self._buffers["scale"]
        if self._scale_mode == "learned":
            scale.copy_(self.scale_param.detach().abs().clamp_min(SCALE_EPS))
        return scale

    def _qat_forward(self, x: Tensor) -> Tensor:
        """QAT with a moving or learned scale: tensor ops only (no host sync)."""
        dtype, scale = self._dtype, self._buffers["scale"]
        if self._scale_mode == "learned":
            s = self.scale_param.abs().clamp_min(SCALE_EPS)
            scale.copy_(s.detach())
            numel = x[0].numel() if x.dim() > 1 else x.numel()
            return lsq_quantize(x, s, dtype.qmin, dtype.qmax, (max(numel, 1) * dtype.qmax) ** -0.5)
        if self.ch_axis is not None or self.qat_averaging_constant == 1.0:
            return quantize_tensor(x, self._follow_batch(x), dtype.qmin, dtype.qmax, self.ch_axis)
        c, ready = self.qat_averaging_constant, self._buffers["scale_ready"]
        if self._scale_known:  # quantize with the scale as it stands (not this batch's), then move it
            hook = _OBSERVING_BACKEND_HOOK and not torch.compiler.is_compiling()
            out = _OBSERVING_BACKEND_HOOK[0](self, x) if hook else None
            if out is not None:
                return out  # the backend ran this whole branch
            amax, finite = self.observer.update_range(x)
            out = quantize_tensor(x, scale, dtype.qmin, dtype.qmax, None)
            batch = (amax / dtype.qmax).clamp_min(SCALE_EPS)
            scale.lerp_(torch.where(finite, batch, scale), c)  # a non-finite batch: lerp to itself
        else:  # no scale yet: the batch's own scale first, the moving average after
            amax, finite = self.observer.update_range(x)
            batch = (amax / dtype.qmax).clamp_min(SCALE_EPS)
            new = torch.where(finite, torch.where(ready, scale.lerp(batch, c), batch), scale)
            out = quantize_tensor(x, torch.where(ready, scale, new), dtype.qmin, dtype.qmax, None)
            scale.copy_(new)
        ready.logical_or_(finite)  # per tensor: finite has shape ()
        return out

    def _follow_batch(self, x: Tensor, row_factor: Tensor | None = None) -> Tensor:
        """Set the scale to the batch's own (of ``x * row_factor``; NaN/inf rows keep theirs); return it."""
        amax, finite = self.observer.update_range(x, row_factor)
        new = torch.where(finite, (amax / self._dtype.qmax).clamp_min(SCALE_EPS), self._buffers["scale"])
        self._buffers["scale"].copy_(new)
        self._buffers["scale_ready"].logical_or_(finite.all())
        return new

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Move with the model; ``scale`` (and ``scale_param``) stay float32 whatever the model's dtype."""
        return apply_keeping_float32(self, super()._apply, fn, recurse)

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self._stale():
            self.refresh_scale()
        if self._scale_mode == "learned":
            self._current_scale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        learned = f"{prefix}scale_param" in state_dict
        if learned and "scale_param" not in self._parameters:  # a checkpoint of a learned-scale run
            self.scale_param = nn.Parameter(self._buffers["scale"].detach().clone())
            self._scale_mode = "learned"
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._dtype = parse_dtype(int(self.dtype_code))
        self._fixed = bool(self.scale_fixed)
        self._scale_known = bool(self.scale_ready)
        if "_batches_before" in self.__dict__:  # loaded in CALIBRATION: the loaded scale holds until new data
            self._batches_before = self.observer.batches_seen()
        if self._fixed:
            self._scale_mode = "fixed"
        elif not learned:
            self._scale_mode = "moving"
        self._dirty = False

    def extra_repr(self) -> str:
        """Return dtype, observer, channel axis, state and QAT scale mode for ``repr``."""
        axis = "" if self.ch_axis is None else f", ch_axis={self.ch_axis}"
        mode = "" if self._scale_mode == "moving" else f", scales={self._scale_mode}"
        return f"dtype={self._dtype}, observer={self.observer_name}{axis}, state={self._state.name}{mode}"


def iter_fake_quantize(module: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """Yield ``(qualified name, node)`` for every :class:`FakeQuantize` in ``module`` (itself included)."""
    for name, sub in module.named_modules():
        if isinstance(sub, FakeQuantize):
            yield name, sub


def set_fake_quantize(module: nn.Module, state: FakeQuantState | str) -> None:
    """Put every quant node in ``module`` into ``state``: ``QAT``, ``CALIBRATION``, ``VALIDATION``, ``FLOAT``.

    Raises:
        TypeError: ``module`` is not a module. ValueError: for an unknown state; both before any change.
    """
    target = FakeQuantState.parse(state)
    for _, node in iter_fake_quantize(require_module(module, "set_fake_quantize")):
        node.state = target


@contextmanager
def fake_quant_state(module: nn.Module, state: FakeQuantState | str) -> Iterator[nn.Module]:
    """Temporarily put every quant node of ``module`` into ``state``; always restore each node's own state."""
    target = FakeQuantState.parse(state)
    saved = [(node, node.state) for _, node in iter_fake_quantize(require_module(module, "fake_quant_state"))]
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
