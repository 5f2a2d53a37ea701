"""``equalize``: cross-layer equalization and SmoothQuant-style migration on the float model, before prepare.

The groups (:mod:`qat_lightning.ptq.equalize_groups`) each share one per-channel scale ``s`` that moves range
between tensors without changing the float function:

* cross-layer: ``s = sqrt(r1 / r2)`` (``r1``: the producer's per-output-channel weight range, BN folded;
  ``r2``: the consumer's per-input-channel range), which makes both ranges ``sqrt(r1 * r2)``; repeated
  ``cle_rounds`` times over all pairs so chains settle.
* layernorm / matmul: SmoothQuant's ``s = max|X|^alpha / max|W|^(1 - alpha)`` (matmul: ``max|A|^alpha /
  max|B|^(1 - alpha)`` of the two activations), per channel on the calibration batches. ``alpha`` is
  searched per group: each candidate is applied, the consumers' inputs are recorded, the consumers' output
  error under symmetric ``dtype`` fake quant (activations per tensor, weights per output channel) is
  measured, and the candidate is undone; the best is kept only if it beats no scaling.

Every applied change is checked on the first batch: the model output must equal the output before within
``tolerance`` (relative to its largest value), else the change is undone and reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from qat_lightning.analysis.inputs import InputFn, ModelInputs, flatten_outputs
from qat_lightning.ptq.capture import calibration_batches, run_all
from qat_lightning.ptq.equalize_groups import FINDERS, ScaleGroup, find_groups
from qat_lightning.ptq.equalize_probe import probe_error, record_nodes
from qat_lightning.quant import iter_fake_quantize, parse_dtype
from qat_lightning.quant.checks import require_count, require_module

__all__ = ["DEFAULT_ALPHAS", "EQUALIZE_KINDS", "EqualizedGroup", "EqualizationResult", "equalize"]

EQUALIZE_KINDS: tuple[str, ...] = tuple(FINDERS)
DEFAULT_ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_EPS = 1e-8


@dataclass(frozen=True)
class EqualizedGroup:
    """One group: what it is, the chosen alpha (``None`` for cross-layer), its consumers' quant error.

    Attributes:
        kind: ``cross_layer``, ``layernorm`` or ``matmul``.
        name: ``producer -> consumers``.
        alpha: the searched SmoothQuant alpha (``None``: cross-layer, or nothing applied).
        error_before: relative output error of the group's ops under fake quant, before.
        error_after: the same after (equal to ``error_before`` when nothing was applied).
        applied: whether the model was changed.
        note: why nothing was applied, if so.
    """

    kind: str
    name: str
    alpha: float | None
    error_before: float
    error_after: float
    applied: bool
    note: str = ""


@dataclass(frozen=True)
class EqualizationResult:
    """Every group found, in the order they were handled."""

    groups: tuple[EqualizedGroup, ...]

    @property
    def applied(self) -> int:
        """How many groups changed the model."""
        return sum(g.applied for g in self.groups)


def _check_args(kinds: Sequence[str], alphas: Sequence[float], cle_rounds: int, tolerance: float) -> None:
    unknown = [k for k in kinds if k not in EQUALIZE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"equalize: kinds {list(kinds)!r} invalid; allowed: {', '.join(EQUALIZE_KINDS)}")
    if not alphas or any(not 0.0 <= float(a) <= 1.0 for a in alphas):
        raise ValueError(
            f"equalize: alphas must be a non-empty list of values in [0, 1], got {list(alphas)!r}"
        )
    require_count("cle_rounds", cle_rounds, "equalize")
    if not tolerance > 0.0:
        raise ValueError(f"equalize: tolerance must be > 0, got {tolerance}")


def _reshape(s: Tensor, p: Tensor, dim: int) -> Tensor:
    shape = [1] * p.dim()
    shape[dim] = -1
    return s.to(p.dtype).reshape(shape)


@torch.no_grad()
def _apply(group: ScaleGroup, s: Tensor) -> None:
    for p, dim in group.divide:
        p.div_(_reshape(s, p, dim))
    for p, dim in group.multiply:
        p.mul_(_reshape(s, p, dim))


@torch.no_grad()
def _restore(group: ScaleGroup, saved: list[Tensor]) -> None:
    for p, old in zip(group.params(), saved, strict=True):
        p.copy_(old)


def _outputs(model: nn.Module, batch: ModelInputs) -> list[Tensor]:
    return [t for _, t in flatten_outputs(run_all(model, [batch])[0])]


def _preserved(model: nn.Module, batch: ModelInputs, reference: list[Tensor], tolerance: float) -> bool:
    new = _outputs(model, batch)
    for a, b in zip(new, reference, strict=True):
        if a.is_floating_point() and float((a - b).abs().max()) > tolerance * max(float(b.abs().max()), _EPS):
            return False
    return True


def _smooth_scale(group: ScaleGroup, act: list[Tensor], alpha: float) -> Tensor:
    """SmoothQuant's per-channel scale for one alpha (channels with a zero range keep scale 1)."""
    if group.kind == "layernorm":
        x = act[0]
        w = torch.stack([p.detach().abs().amax(0) for p, _ in group.multiply]).amax(0)
    else:
        x, w = act
    s = x.double().clamp_min(_EPS).pow(alpha) / w.double().clamp_min(_EPS).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


def _search(
    gm: fx.GraphModule, group: ScaleGroup, batches: list[ModelInputs], alphas: Sequence[float], dtype: Any
) -> tuple[float | None, float, float]:
    """Best alpha (``None``: no scaling is best), and the error without and with it."""
    act, probes = record_nodes(gm, batches, group.act_nodes, group.probes)
    base, reference = probe_error(gm, group.probes, probes, dtype)
    best: tuple[float | None, float] = (None, base)
    for alpha in alphas:
        saved = [p.detach().clone() for p in group.params()]
        _apply(group, _smooth_scale(group, act, float(alpha)))
        err, _ = probe_error(
            gm, group.probes, record_nodes(gm, batches, [], group.probes)[1], dtype, reference
        )
        _restore(group, saved)
        if err < best[1]:
            best = (float(alpha), err)
    return best[0], base, best[1]


def _smooth(
    gm: fx.GraphModule,
    group: ScaleGroup,
    batches: list[ModelInputs],
    alphas: Sequence[float],
    dtype: Any,
    check: Any,
) -> EqualizedGroup:
    alpha, before, after = _search(gm, group, batches, alphas, dtype)
    if alpha is None:
        return EqualizedGroup(
            group.kind, group.name, None, before, before, False, "no alpha beats no scaling"
        )
    saved = [p.detach().clone() for p in group.params()]
    act, _ = record_nodes(gm, batches, group.act_nodes, [])
    _apply(group, _smooth_scale(group, act, alpha))
    if not check():
        _restore(group, saved)
        return EqualizedGroup(
            group.kind, group.name, None, before, before, False, "not function-preserving: undone"
        )
    return EqualizedGroup(group.kind, group.name, alpha, before, after, True)


def _group_error(gm: fx.GraphModule, group: ScaleGroup, batches: list[ModelInputs], dtype: Any) -> float:
    return probe_error(gm, group.probes, record_nodes(gm, batches, [], group.probes)[1], dtype)[0]


def _cross_layer(
    gm: fx.GraphModule,
    groups: list[ScaleGroup],
    batches: list[ModelInputs],
    rounds: int,
    dtype: Any,
    check: Any,
) -> list[EqualizedGroup]:
    before = [_group_error(gm, g, batches, dtype) for g in groups]
    saved = [[p.detach().clone() for p in g.params()] for g in groups]
    for _ in range(rounds):
        for g in groups:
            assert g.weight_ranges is not None  # set by the cross-layer finder
            r1, r2 = g.weight_ranges()
            s = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(_EPS)).sqrt(), torch.ones_like(r1))
            _apply(g, s)
    if not check():
        for g, old in zip(groups, saved, strict=True):
            _restore(g, old)
        return [
            EqualizedGroup(g.kind, g.name, None, b, b, False, "not function-preserving: undone")
            for g, b in zip(groups, before, strict=True)
        ]
    after = [_group_error(gm, g, batches, dtype) for g in groups]
    return [
        EqualizedGroup(g.kind, g.name, None, b, a, True)
        for g, b, a in zip(groups, before, after, strict=True)
    ]


def _trace(float_model: nn.Module) -> fx.GraphModule:
    require_module(float_model, "equalize", "float_model")
    if any(True for _ in iter_fake_quantize(float_model)):
        raise ValueError(
            "equalize: the model is already prepared; equalize the float model before ql.prepare"
        )
    try:
        return fx.symbolic_trace(float_model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means the same to the user
        raise ValueError(
            f"equalize: the float model is not fx-traceable ({type(err).__name__}: {err})"
        ) from err


def equalize(
    float_model: nn.Module,
    dataloader: Iterable[Any],
    *,
    num_batches: int | None = 4,
    input_fn: InputFn | None = None,
    kinds: Sequence[str] = EQUALIZE_KINDS,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    cle_rounds: int = 3,
    dtype: Any = "qint8",
    tolerance: float = 1e-4,
) -> EqualizationResult:
    """Equalize a float model in place (before prepare): the float function is kept, quant ranges even out.

    Args:
        float_model: the float model (fx-traceable); its parameters are changed in place.
        dataloader: calibration batches (the activation ranges and the alpha search).
        num_batches: how many batches to use (``None``: all).
        input_fn: batch -> model inputs (default: tensor / first element / dict as kwargs).
        kinds: which groups to equalize: ``cross_layer``, ``layernorm``, ``matmul``.
        alphas: SmoothQuant alphas tried per group.
        cle_rounds: passes of cross-layer equalization over all pairs.
        dtype: the integer type the alpha search simulates (``qint8`` / ``qint16``).
        tolerance: largest change of the model output allowed, relative to its largest value.

    Returns:
        Every group found, with its alpha, its error before and after, and whether it was applied.

    Raises:
        ValueError: for a prepared or non-traceable model, an unknown kind, alphas outside [0, 1], bad
            ``num_batches`` / ``cle_rounds`` / ``tolerance``, or an empty dataloader.
    """
    _check_args(kinds, alphas, cle_rounds, tolerance)
    qdtype = parse_dtype(dtype)
    if not qdtype.is_integer:
        raise ValueError(f"equalize: dtype must be qint8 or qint16, got {qdtype.name}")
    gm = _trace(float_model)
    batches = calibration_batches(dataloader, num_batches, input_fn, "equalize")
    reference = _outputs(float_model, batches[0])

    def check() -> bool:
        return _preserved(float_model, batches[0], reference, tolerance)

    groups = find_groups(gm, tuple(kinds))
    cle = [g for g in groups if g.kind == "cross_layer"]
    rows = _cross_layer(gm, cle, batches, int(cle_rounds), qdtype, check) if cle else []
    for group in groups:
        if group.kind != "cross_layer":
            rows.append(_smooth(gm, group, batches, alphas, qdtype, check))
    return EqualizationResult(tuple(rows))
