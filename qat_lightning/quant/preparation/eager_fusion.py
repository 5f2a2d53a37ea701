"""Fusion on the eager path: the user's fuse hook marks conv/linear + BN [+ residual add] [+ ReLU] groups.

Eager mode cannot see the functional code between modules, so, as in torch.ao's eager mode, fusion is the
user's job, done by a *fuse hook* that ``prepare`` runs on its copy of the model:

* ``prepare(..., fuse_fn=fn)``: ``fn(model)`` changes the model in place (or returns the fused model),
  before anything else, whatever the method;
* or a ``fuse_model()`` method on the model (torch.ao's eager convention), called by eager mode (and the
  ``auto`` fallback) when ``fuse_fn`` is not given.

Inside the hook, :func:`fuse_modules` (this module) replaces ``[conv, bn, relu]`` by one
:class:`EagerFused` module at the conv's path and the others by ``nn.Identity`` (so ``forward`` is
unchanged). For a residual add the group names ``"add"`` (``[conv, bn, "add", relu]``): the fused module
then takes ``(x, residual)``, so ``forward`` calls ``self.conv2(out, identity)`` after fusing. torch.ao's
own ``fuse_modules`` output (``ConvBn2d``, ``ConvBnReLU2d``, ``ConvReLU2d``, ``LinearReLU``,
``LinearBn1d``, ...) is understood too. Eager prepare turns each fused module into one op (one output
quant node after the last member), exactly like an fx fused group: ``QatConvBn`` with BN (``qat_mode``
applies), ``QatGemm`` with ``relu`` without.

The fx path fuses by itself: it does not call ``fuse_model()``; an explicit ``fuse_fn`` runs there too
(fused modules are traced through), so one model works with both methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.intrinsic import _FusedModule

from qat_lightning.quant.checks import require_module
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.preparation.build import OpPlan
from qat_lightning.quant.preparation.fusion import fused_type_name
from qat_lightning.quant.preparation.op_costs import gemm_module_flops
from qat_lightning.quant.preparation.tables import (
    BN_FOR_CONV,
    CONV_TYPES,
    gemm_spec_of,
)

__all__ = [
    "EagerFused",
    "FusedParts",
    "fuse_modules",
    "fused_parts",
    "fused_plan",
    "run_fuse_hook",
    "unfused_chains",
]

_ADD = "add"


class EagerFused(nn.Module):
    """``gemm`` [-> ``bn``] [-> ``+ residual``] [-> ReLU], one op for eager prepare (float semantics).

    Args:
        gemm: the conv / linear module.
        bn: its BatchNorm, or ``None``.
        add: take ``(x, residual)`` and add ``residual`` after the BN.
        relu: a ReLU last.
    """

    def __init__(
        self, gemm: nn.Module, bn: nn.Module | None = None, add: bool = False, relu: bool = False
    ) -> None:
        super().__init__()
        self.gemm = gemm
        self.bn = bn
        self.add = add
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``relu(bn(gemm(x)) + residual)`` with the parts that are present."""
        y = self.gemm(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.add:
            if residual is None:
                raise TypeError("this fused module includes the residual add: call it as fused(x, residual)")
            y = y + residual
        return torch.relu(y) if self.relu else y


@dataclass(frozen=True)
class FusedParts:
    """What a fused module holds (for eager prepare)."""

    gemm: nn.Module
    bn: nn.Module | None
    add: bool
    relu: bool


def fused_parts(module: nn.Module) -> FusedParts | None:
    """Return the parts of an :class:`EagerFused` or torch.ao intrinsic fused module, else ``None``."""
    if isinstance(module, EagerFused):
        return FusedParts(module.gemm, module.bn, module.add, module.relu)
    if not isinstance(module, _FusedModule) or not len(module):
        return None
    children = list(module)
    gemm = children[0]
    if not (isinstance(gemm, CONV_TYPES) or type(gemm) is nn.Linear):
        return None  # BNReLU2d, ConvAdd2d (an add callable, no module): not a gemm group we build
    bn = next((c for c in children[1:] if isinstance(c, nn.modules.batchnorm._BatchNorm)), None)
    relu = any(isinstance(c, nn.ReLU) for c in children[1:])
    if len(children) != 1 + (bn is not None) + relu:
        return None
    return FusedParts(gemm, bn, False, relu)


def fused_plan(
    name: str,
    call_index: int,
    path: str,
    parts: FusedParts,
    producers: tuple[str | None, ...],
    shapes: tuple[tuple[int, ...] | None, tuple[int, ...] | None],
) -> OpPlan:
    """Plan the eager op of one call of a fused module (``shapes``: its input and output shapes)."""
    gemm = parts.gemm
    spec = gemm_spec_of(gemm)
    op_type = fused_type_name(gemm, parts.bn is not None, parts.add, parts.relu)
    flops = gemm_module_flops(gemm, *shapes)
    info = OpInfo(name, op_type, OpKind.GEMM, path, call_index, producers[: 2 if parts.add else 1], flops)
    return OpPlan(
        info,
        "convbn" if parts.bn is not None else "gemm",
        module=gemm,
        bn=parts.bn,
        gemm_kind=spec.kind,
        weight_ch_axis=spec.weight_ch_axis,
        relu=parts.relu,
        add=parts.add,
        weight_key=path,
        extra={"path": path},
    )


def _module(model: nn.Module, path: str, group: Sequence[str]) -> nn.Module:
    """Return the submodule at ``path``; a path that names none is a ValueError listing what is there."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        parent, reached = model, []
        for part in path.split(".")[:-1]:  # the deepest module the path does reach
            if part not in parent._modules:
                break
            parent, reached = parent._modules[part], [*reached, part]
        where = ".".join(reached) or type(model).__name__
        raise ValueError(
            f"fuse group {list(group)}: {path!r} names no module; children of {where}: "
            f"{', '.join(parent._modules) or 'none'}"
        ) from None


def _check_group(model: nn.Module, group: Sequence[str]) -> tuple[str, str | None, bool, str | None]:
    if isinstance(group, str):
        raise ValueError(
            f"fuse_modules: groups must be a list of groups (lists of module paths), got a group of str "
            f"{group!r}; e.g. [[{group!r}, ...]]"
        )
    names = list(group)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"a fuse group is a list of module paths starting with a conv/linear, got {group!r}")
    gemm = _module(model, names[0], names)
    if not (isinstance(gemm, CONV_TYPES) or type(gemm) is nn.Linear):
        raise ValueError(
            f"fuse group {names}: {names[0]} must be a Conv1d/2d/3d or Linear, got {type(gemm).__name__}"
        )
    rest = names[1:]
    bn_path = None
    if (
        rest
        and rest[0] != _ADD
        and isinstance(_module(model, rest[0], names), nn.modules.batchnorm._BatchNorm)
    ):
        bn_path = rest.pop(0)
    if bn_path is not None:
        bn_type = BN_FOR_CONV[type(gemm) if type(gemm) in BN_FOR_CONV else nn.Linear]
        if type(model.get_submodule(bn_path)) is not bn_type:
            raise ValueError(f"fuse group {names}: {bn_path} must be a {bn_type.__name__}")
    add = bool(rest) and rest[0] == _ADD
    if add:
        rest.pop(0)
        if bn_path is None:
            raise ValueError(
                f"fuse group {names}: a residual add is fused after a BatchNorm only (as in fx mode)"
            )
    relu_path = rest.pop(0) if rest else None
    if relu_path is not None and not isinstance(_module(model, relu_path, names), nn.ReLU):
        raise ValueError(f"fuse group {names}: {relu_path} must be an nn.ReLU")
    if rest or (bn_path is None and relu_path is None):
        raise ValueError(
            f"fuse group {names}: allowed forms are [gemm, bn], [gemm, relu], [gemm, bn, relu], "
            "[gemm, bn, 'add'] and [gemm, bn, 'add', relu]"
        )
    return names[0], bn_path, add, relu_path


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    (model.get_submodule(parent) if parent else model).add_module(attr, module)


def fuse_modules(model: nn.Module, groups: Sequence[Sequence[str]]) -> nn.Module:
    """Fuse each group in place: its first module becomes :class:`EagerFused`, the others ``nn.Identity``.

    Args:
        model: the model (``prepare`` passes its own copy to the fuse hook).
        groups: module paths, e.g. ``[["conv1", "bn1", "relu1"], ["conv2", "bn2", "add", "relu2"]]``;
            ``"add"`` fuses the residual add (the fused module then takes ``(x, residual)``).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a group of another form, a path that names no module (the message lists the children
            where it stops), a wrong module type, or a path used twice; all before any change.
    """
    require_module(model, "fuse_modules", "model")
    checked = [_check_group(model, g) for g in groups]
    paths = [p for c in checked for p in (c[0], c[1], c[3]) if p is not None]
    if len(set(paths)) != len(paths):
        raise ValueError(
            "fuse_modules: a module is in more than one group: "
            f"{sorted(p for p in paths if paths.count(p) > 1)}"
        )
    for gemm_path, bn_path, add, relu_path in checked:
        bn = model.get_submodule(bn_path) if bn_path else None
        _set(model, gemm_path, EagerFused(model.get_submodule(gemm_path), bn, add, relu_path is not None))
        for path in (bn_path, relu_path):
            if path is not None:
                _set(model, path, nn.Identity())
    return model


def run_fuse_hook(model: nn.Module, fuse_fn: Callable[[nn.Module], Any] | None) -> nn.Module:
    """Run ``fuse_fn(model)`` (or ``model.fuse_model()`` when ``fuse_fn`` is ``None``) on ``model``, a copy.

    Returns the fused model: ``fuse_fn``'s return value when it is a module, else ``model``.

    Raises:
        TypeError: ``fuse_fn`` is not callable, or returns something other than ``None`` or a module.
    """
    if fuse_fn is None:
        hook = getattr(model, "fuse_model", None)
        if not callable(hook):
            return model
        result = hook()
    else:
        if not callable(fuse_fn):
            raise TypeError(f"fuse_fn must be a callable fuse_fn(model), got {type(fuse_fn).__name__}")
        result = fuse_fn(model)
    if result is None:
        return model
    if not isinstance(result, nn.Module):
        raise TypeError(f"the fuse hook must return None or the fused nn.Module, got {type(result).__name__}")
    return result


def unfused_chains(events: Sequence[Any], modules: Mapping[str, nn.Module]) -> list[tuple[str, ...]]:
    """Fusable conv/linear -> bn -> relu chains of the probe's call events (eager mode, for the report)."""
    consumers: dict[int, list[Any]] = {}
    for ev in events:
        if ev.in_ids:
            consumers.setdefault(ev.in_ids[0], []).append(ev)

    def follower(ev: Any, kinds: tuple[type, ...]) -> Any | None:
        for nxt in consumers.get(ev.out_id, []) if ev.out_id is not None else []:
            if isinstance(modules.get(nxt.path), kinds):
                return nxt
        return None

    def site(ev: Any) -> str:
        return ev.path if ev.call_index == 0 else f"{ev.path}#{ev.call_index}"

    chains = []
    for ev in events:
        mod = modules.get(ev.path)
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        chain = [site(ev)]
        bn = follower(ev, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        last = ev
        if bn is not None:
            chain.append(site(bn))
            last = bn
        relu = follower(last, (nn.ReLU,))
        if relu is not None:
            chain.append(site(relu))
        if len(chain) > 1:
            chains.append(tuple(chain))
    return chains
