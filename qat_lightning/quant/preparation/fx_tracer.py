"""torch.fx symbolic tracing that also runs the example inputs, node by node.

Plain ``torch.fx.symbolic_trace`` fails on most real models (HuggingFace transformers included) as soon
as Python code looks at a shape (``batch, seq = x.shape``, ``if seq > 512``), and it cannot tell static
control flow from data-dependent control flow. This tracer keeps, next to each graph node, the value that
node takes on the example inputs (computed on a throw-away copy of the model), so that:

* shapes stay symbolic in the graph (``x.size(1)`` is a node; the prepared model runs on any batch size),
  but Python control flow that *reads* a shape (``if``, ``len``, unpacking) is resolved with the example
  value, like HuggingFace's own (removed) fx tracer did;
* ``.dtype`` / ``.ndim`` / ``.layout`` are concrete;
* control flow on a tensor *value* (``if x.sum() > 0``) is detected and reported as :class:`FxTraceError`
  with the model's source line, instead of being silently baked into the graph;
* every node gets its example value's shape / dtype (``TraceResult.meta``), used for FLOPs and to decide
  what is an activation;
* a module built inside ``forward`` (``nn.ReLU()(x)``, as HuggingFace's DistilBERT does) is traced
  through like a function (its ops become graph nodes); one with parameters or buffers is refused, since
  it would be rebuilt with new weights on every call;
* the guide's switches called inside ``forward`` (``GlobalFakeQuantSwitch.disable()``,
  ``FakeCast.disable()`` and their ``enable()``) become graph nodes (:mod:`.fx_switches`), so the
  prepared graph toggles them at run time exactly where the eager model does.
"""

from __future__ import annotations

import inspect
import linecache
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import Node, map_aggregate

from qat_lightning.quant.preparation.fx_switches import recording_switches, set_switch

__all__ = ["FxTraceError", "NodeMeta", "ReloadTracer", "TraceResult", "trace_with_values", "user_source_line"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # qat_lightning/

#: Tensor factories that get a graph node when one of their arguments is symbolic.
_FACTORIES = (
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "rand",
    "randn",
    "randint",
    "eye",
    "linspace",
    "tensor",
)
#: Tensor attributes that are resolved to their example value (static for a given model).
_STATIC_ATTRS = frozenset({"dtype", "ndim", "layout", "is_cuda", "is_sparse", "is_quantized"})
_EXTREME = 1e30  # |value| from which an example value is extreme (``finfo(float32).min`` is -3.4e38)


class FxTraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the failing line and suggests eager/auto."""


@dataclass(frozen=True)
class NodeMeta:
    """Example-value facts of one graph node."""

    is_tensor: bool
    shape: tuple[int, ...] | None = None
    is_float: bool = False
    dtype: torch.dtype | None = None
    is_tensor_seq: bool = False  # a tuple / list of tensors (e.g. an LSTM output, chunk())
    extreme: bool = False  # a float tensor holding +-inf or |x| >= 1e30 (a mask, finfo.min)


@dataclass
class TraceResult:
    """Output of :func:`trace_with_values`."""

    graph_module: fx.GraphModule
    meta: dict[Node, NodeMeta]
    input_names: tuple[str, ...]


def _is_user_frame(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not (path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIR) or filename.startswith("<"))


def user_source_line(tb: TracebackType | FrameType | None) -> str | None:
    """``file:line: code`` of the innermost frame of model code (outside torch and this package)."""
    frames: list[tuple[str, int]] = []
    if isinstance(tb, TracebackType):
        frames = [(fs.filename, fs.lineno or 0) for fs in traceback.extract_tb(tb)]
    else:
        frame = tb
        while frame is not None:
            frames.append((frame.f_code.co_filename, frame.f_lineno))
            frame = frame.f_back
        frames.reverse()
    for filename, lineno in reversed(frames):
        if _is_user_frame(filename):
            code = linecache.getline(filename, lineno).strip()
            return f"{filename}:{lineno}: {code}"
    return None


class _DataDependent(fx.proxy.TraceError):
    def __init__(self, what: str, where: str | None) -> None:
        self.what = what
        self.where = where
        super().__init__(f"{what} at {where}" if where else what)


class _ValueProxy(fx.Proxy):
    """A Proxy whose example value is known to its tracer."""

    def __getattr__(self, k: str) -> Any:
        if k in _STATIC_ATTRS:
            value = self.tracer.value_of(self.node)  # type: ignore[attr-defined]
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return _ValueAttribute(self, k)

    def __index__(self) -> int:
        raise _DataDependent(
            "a Python int from a tensor shape (range(x.shape[0]), a loop over a shape): its trip count "
            "varies with the input; wrap the loop body in dynamic_block() and use method='eager' or 'auto'",
            user_source_line(sys._getframe()),
        )

    def __len__(self) -> int:
        value = self.tracer.value_of(self.node)  # type: ignore[attr-defined]
        if isinstance(value, torch.Tensor):
            raise _DataDependent("len() of a tensor", user_source_line(sys._getframe()))
        return len(value)


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


class ReloadTracer(fx.Tracer):
    """The tracer ``torch.load`` uses to rebuild a prepared GraphModule from its code (buffers proxied)."""

    proxy_buffer_attributes = True


class _ValueTracer(fx.Tracer):
    """fx Tracer propagating example values (see the module docstring)."""

    proxy_buffer_attributes = True

    def __init__(
        self,
        shadow: nn.Module,
        placeholder_values: Mapping[str, Any],
        leaf: Callable[[nn.Module], bool],
        n_positional: int,
    ) -> None:
        super().__init__(autowrap_modules=(math,))
        self._n_positional = n_positional
        self._shadow = shadow
        self._placeholder_values = dict(placeholder_values)
        self._leaf = leaf
        self._values: dict[Node, Any] = {}
        self._computing = False

    # ---- values -------------------------------------------------------------------------------------
    def value_of(self, node: Node) -> Any:
        return self._values.get(node)

    def _arg_value(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            return self._values.get(a.node)
        if isinstance(a, Node):
            return self._values.get(a)
        return a

    def _lookup(self, root: nn.Module, target: str) -> Any:
        obj: Any = root
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return obj

    def _compute(self, node: Node) -> Any:
        args = map_aggregate(node.args, self._arg_value)
        kwargs = map_aggregate(node.kwargs, self._arg_value)
        op, target = node.op, node.target
        if op == "placeholder":
            return self._placeholder_values.get(str(target))
        if op == "get_attr":
            try:
                return self._lookup(self._shadow, str(target))
            except AttributeError:
                return self._lookup(self.root, str(target))
        if op == "call_function" and target is set_switch:
            return None  # run at run time only; tracing must not flip the process-wide switch
        self._computing = True
        try:
            if op == "call_function":
                return target(*args, **kwargs)  # type: ignore[operator]
            if op == "call_method":
                return getattr(args[0], str(target))(*args[1:], **kwargs)
            if op == "call_module":
                return self._shadow.get_submodule(str(target))(*args, **kwargs)
        finally:
            self._computing = False
        return None

    def record_switch(self, switch: str, enabled: Any) -> fx.Proxy:
        """Add a :func:`.fx_switches.set_switch` node (a switch toggled in forward)."""
        proxy = self.create_proxy("call_function", set_switch, (switch, enabled), {})
        proxy.node.meta["source_line"] = user_source_line(sys._getframe())
        return proxy

    # ---- tracer hooks -------------------------------------------------------------------------------
    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # noqa: D102
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind != "output":
            try:
                with torch.no_grad():
                    self._values[proxy.node] = self._compute(proxy.node)
            except _DataDependent:
                raise
            except Exception as exc:  # the op ran in eager mode, so tracing changed its meaning
                where = user_source_line(sys._getframe())
                raise _DataDependent(
                    f"running {kind} {getattr(target, '__name__', target)} on example values failed ({exc})",
                    where,
                ) from exc
        return proxy

    def proxy(self, node: Node) -> fx.Proxy:  # noqa: D102
        return _ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:  # noqa: D102
        value = self._values.get(obj.node)
        if isinstance(value, torch.Tensor):
            raise _DataDependent(
                "data-dependent control flow (a tensor value decides a Python branch)",
                user_source_line(sys._getframe()),
            )
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Any:  # noqa: D102
        value = self._values.get(obj.node)
        if isinstance(value, torch.Tensor) or value is None:
            raise _DataDependent("iteration over a tensor", user_source_line(sys._getframe()))
        return iter([obj[i] for i in range(len(value))])

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        return self._leaf(m)

    def call_module(self, m, forward, args, kwargs):  # noqa: D102
        if self._computing:
            return forward(*args, **kwargs)
        try:
            self.path_of_module(m)
        except NameError:  # built inside forward (``nn.ReLU()(x)``): trace it like a function
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise _DataDependent(
                    f"a {type(m).__name__} with parameters or buffers is built inside forward (it gets new "
                    "weights on every call); create it in __init__ as a submodule",
                    user_source_line(sys._getframe()),
                ) from None
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # noqa: D102
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # noqa: D102
        names = list(self._placeholder_values)
        n_pos = self._n_positional
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in names]

        def root(module: nn.Module, *flat: Any) -> Any:
            return root_fn(module, *flat[:n_pos], **dict(zip(names[n_pos:], flat[n_pos:], strict=True)))

        root.__annotations__ = {}  # fx would copy a (string) return annotation into the generated code

        return root, [self.root, *proxies]


def _factory_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        found: list[fx.Proxy] = []

        def find(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                found.append(a)
            return a

        map_aggregate(args, find)
        map_aggregate(kwargs, find)
        if found:
            return found[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _to_meta(value: Any) -> NodeMeta:
    if isinstance(value, torch.Tensor):
        is_float = value.is_floating_point()
        known = is_float and value.numel() > 0 and value.device.type != "meta"
        extreme = known and bool((value.abs() >= _EXTREME).any())
        return NodeMeta(True, tuple(value.shape), is_float, value.dtype, extreme=extreme)
    if isinstance(value, (tuple, list)) and value and any(isinstance(v, torch.Tensor) for v in value):
        return NodeMeta(False, is_tensor_seq=True)
    return NodeMeta(False)


def _positional_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names: list[str] = []
    for i in range(count):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"input_{i}")
    return names


def trace_with_values(
    model: nn.Module,
    shadow: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    leaf: Callable[[nn.Module], bool],
) -> TraceResult:
    """Trace ``model`` with fx, computing every node's example value on ``shadow`` (a copy of ``model``).

    Args:
        model: the module to trace (its structure is what the graph refers to; it is not run).
        shadow: a deep copy of ``model`` used to compute example values (it is run, and may be changed).
        args: positional example inputs (placeholders named after ``forward``'s parameters).
        kwargs: keyword example inputs (placeholders named after the keys).
        leaf: modules for which a ``call_module`` node is emitted instead of tracing inside.

    Raises:
        FxTraceError: the model cannot be traced; the message names the failing source line.
    """
    pos_names = _positional_names(model, len(args))
    values: dict[str, Any] = {}
    for name, value in zip(pos_names, args, strict=True):
        values[name] = value
    for key, value in kwargs.items():
        if not key.isidentifier() or key in values:
            raise FxTraceError(f"example input keyword {key!r} cannot be a graph input name")
        values[key] = value
    tracer = _ValueTracer(shadow, values, leaf, len(args))
    patched = {name: getattr(torch, name) for name in _FACTORIES}
    try:
        for name, fn in patched.items():
            setattr(torch, name, _factory_wrapper(fn))
        with recording_switches(tracer.record_switch):
            graph = tracer.trace(model)
    except _DataDependent as exc:
        raise FxTraceError(_message(exc.what, exc.where)) from exc
    except FxTraceError:
        raise
    except Exception as exc:
        where = user_source_line(exc.__traceback__)
        raise FxTraceError(_message(f"{type(exc).__name__}: {exc}", where)) from exc
    finally:
        for name, fn in patched.items():
            setattr(torch, name, fn)
    meta = {node: _to_meta(value) for node, value in tracer._values.items()}
    graph._tracer_cls = ReloadTracer  # unpickling re-traces the generated code with this tracer
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return TraceResult(gm, meta, tuple(values))


def _message(what: str, where: str | None) -> str:
    at = f"\n  at {where}" if where else ""
    return (
        f"torch.fx cannot trace this model: {what}{at}\n"
        "Use prepare(..., method='eager') (module swapping, for code fx cannot trace) or method='auto' "
        "(fx, falling back to eager)."
    )
