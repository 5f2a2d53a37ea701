"""Partial quantization (the seed's last-resort locator): run chosen ops in float, and bisect for the culprit.

* :class:`FakeQuantSwitch` turns fake quant (and optionally fake cast) off for ops matched by name, during
  the stages you choose, and restores every node's own state after each batch.
* :func:`float_ops` is the same as a context manager for plain-torch use.
* :func:`bisect_float_blocks` is the seed's "binary search to narrow down the scope": on plain callables,
  the smallest contiguous run of blocks whose float execution brings the metric back to a target;
  :func:`bisect_model_blocks` wires it to a prepared model and an ``eval_fn(model) -> float``.

Patterns: a pattern with glob characters (``*?[``) is matched with :func:`fnmatch.fnmatchcase` against op
names (``"head.*"`` also matches the op ``head`` itself); a plain name is a prefix on name components
(``"head"`` matches ``head``, ``head.cls`` and ``head#1``, not ``header``), like ``ModuleNameTemplate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from qat_lightning.callbacks._common import get_submodule
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize
from qat_lightning.quant.ops import iter_quant_ops, quant_nodes_of

__all__ = [
    "STAGES",
    "FakeQuantSwitch",
    "BisectResult",
    "match_name",
    "matched_nodes",
    "float_ops",
    "block_patterns",
    "bisect_float_blocks",
    "bisect_model_blocks",
]

STAGES = ("fit", "validate", "test", "predict")
_GLOB = set("*?[")


def _prefix_match(prefix: str, name: str) -> bool:
    if prefix == "" or name == prefix:
        return True
    return name.startswith(prefix) and name[len(prefix)] in ".#"


def match_name(pattern: str, name: str) -> bool:
    """Whether op ``name`` is matched by ``pattern`` (glob, or prefix on name components)."""
    if _GLOB & set(pattern):
        if fnmatchcase(name, pattern):
            return True
        return (
            pattern.endswith(".*") and not (_GLOB & set(pattern[:-2])) and _prefix_match(pattern[:-2], name)
        )
    return _prefix_match(pattern, name)


def matched_nodes(
    model: nn.Module, patterns: Sequence[str], fake_cast: bool = True
) -> tuple[list[str], list[FakeQuantize], list[str]]:
    """Resolve patterns to ops and their quant nodes.

    Args:
        model: a prepared network.
        patterns: op-name patterns.
        fake_cast: include float16 (fake cast) nodes; ``False`` keeps them casting.

    Returns:
        ``(matched op names, their quant nodes, patterns that matched nothing)``. Without op records (a
        hand-made model) the quant nodes' owner module paths play the role of op names.
    """
    ops = [(name, quant_nodes_of(op)) for name, op in iter_quant_ops(model)]
    if not ops:
        ops = [(name.rpartition(".")[0] or name, {"node": node}) for name, node in iter_fake_quantize(model)]
    names: list[str] = []
    nodes: list[FakeQuantize] = []
    hits = dict.fromkeys(patterns, False)
    for name, op_nodes in ops:
        which = [p for p in patterns if match_name(p, name)]
        if not which:
            continue
        for p in which:
            hits[p] = True
        if name not in names:
            names.append(name)
        for node in op_nodes.values():
            if (fake_cast or not node.dtype.is_float16) and all(node is not n for n in nodes):
                nodes.append(node)
    return names, nodes, [p for p, hit in hits.items() if not hit]


@contextmanager
def float_ops(model: nn.Module, patterns: Sequence[str], fake_cast: bool = True) -> Iterator[list[str]]:
    """Run the matched ops in float inside the block; every node's own state is restored on exit.

    Yields:
        The matched op names.
    """
    names, nodes, _ = matched_nodes(model, list(patterns), fake_cast)
    saved = [(node, node.state) for node in nodes]
    try:
        for node in nodes:
            node.state = FakeQuantState.FLOAT
        yield names
    finally:
        for node, state in saved:
            node.state = state


# ----------------------------------------------------------------------------------------------- callback
class FakeQuantSwitch(Callback):
    r"""Partial quantization: the matched ops run in float during the chosen stages.

    The switch is applied at each batch start and undone at each batch end (and on exceptions), so it
    composes with the other callbacks' state changes and never outlives a batch. Calibration is not affected
    (values pass through unchanged in CALIBRATION anyway): switching an op back on later finds it calibrated.

    Args:
        disable: op-name patterns to run in float (``["head.*"]``, ``["backbone.layer3"]``).
        fake_cast: also turn off float16 fake cast of the matched ops (the seed's ``FakeCast.disable()``);
            ``False`` disables only integer fake quantization.
        stages: where it applies: ``"fit"`` (training and the validation inside fit), ``"validate"``,
            ``"test"``, ``"predict"``.
        submodule: attribute path of the network inside the LightningModule.

    Raises:
        ValueError: at construction for an empty ``disable`` or an unknown stage.
    """

    def __init__(
        self,
        disable: Sequence[str] | str = ("head.*",),
        fake_cast: bool = True,
        stages: Sequence[str] = ("fit", "validate", "test"),
        submodule: str = "model",
    ) -> None:
        super().__init__()
        patterns = [disable] if isinstance(disable, str) else list(disable)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"disable must be a non-empty list of op-name patterns, got {disable!r}")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
        self.disable = patterns
        self.fake_cast = fake_cast
        self.stages = tuple(stages)
        self.submodule = submodule
        self.disabled_ops: list[str] = []
        self._nodes: list[FakeQuantize] | None = None
        self._model_id: int | None = None
        self._saved: list[tuple[FakeQuantize, FakeQuantState]] = []

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint."""
        return self._generate_state_key(submodule=self.submodule, disable=self.disable)

    # ---------------------------------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Switch the matched ops to float for this training batch."""
        self._apply(pl_module, "fit")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        """Switch the matched ops to float for this validation batch."""
        self._apply(pl_module, "fit" if trainer.state.fn == TrainerFn.FITTING else "validate")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Switch the matched ops to float for this test batch."""
        self._apply(pl_module, "test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Switch the matched ops to float for this prediction batch."""
        self._apply(pl_module, "predict")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Restore the matched ops' states."""
        self._restore()

    def state_dict(self) -> dict[str, Any]:
        """Plain config."""
        return {"disable": list(self.disable), "fake_cast": self.fake_cast, "stages": list(self.stages)}

    # ---------------------------------------------------------------------------------------------- helpers
    def _resolve(self, pl_module: pl.LightningModule) -> list[FakeQuantize]:
        model = get_submodule(pl_module, self.submodule)
        if self._nodes is None or self._model_id != id(model):
            names, nodes, unmatched = matched_nodes(model, self.disable, self.fake_cast)
            if unmatched:
                rank_zero_warn(f"FakeQuantSwitch: pattern(s) {unmatched} match no quantized op")
            self._nodes, self._model_id, self.disabled_ops = nodes, id(model), names
            rank_zero_info(
                f"FakeQuantSwitch: {len(names)} op(s) run in float during {self.stages}: {names[:10]}"
            )
        return self._nodes

    def _apply(self, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        if stage not in self.stages:
            return
        for node in self._resolve(pl_module):
            self._saved.append((node, node.state))
            node.state = FakeQuantState.FLOAT

    def _restore(self) -> None:
        for node, state in reversed(self._saved):
            node.state = state
        self._saved = []


# ----------------------------------------------------------------------------------------------- bisection
@dataclass(frozen=True)
class BisectResult:
    """Outcome of :func:`bisect_float_blocks`.

    Attributes:
        blocks: the smallest contiguous run of candidates whose float execution reaches the target (empty when
            the quantized model already does; all candidates when even all-float does not).
        metric: the metric with ``blocks`` in float.
        quantized_metric: the metric with nothing in float.
        float_metric: the metric with every candidate in float.
        found: whether ``blocks`` reaches the target.
        probes: every evaluation made, ``(blocks in float, metric)``, in order.
    """

    blocks: tuple[str, ...]
    metric: float
    quantized_metric: float
    float_metric: float
    found: bool
    probes: tuple[tuple[tuple[str, ...], float], ...]


def bisect_float_blocks(
    candidates: Sequence[str],
    evaluate: Callable[[Sequence[str]], float],
    target: float,
    higher_is_better: bool = True,
) -> BisectResult:
    """Find the smallest contiguous run of ``candidates`` whose float execution reaches ``target``.

    Two binary searches (about ``2 log2 n`` evaluations): the shortest prefix ``candidates[:k]`` that reaches
    the target, then the latest start ``j`` such that ``candidates[j:k]`` still does. It assumes that running
    more blocks in float never makes the metric worse (true in practice for quantization error).

    Args:
        candidates: block names in graph order (op names or patterns).
        evaluate: ``evaluate(blocks_in_float) -> metric``.
        target: the metric to reach.
        higher_is_better: direction of the metric.

    Raises:
        ValueError: for an empty candidate list.
    """
    items = tuple(candidates)
    if not items:
        raise ValueError("bisect_float_blocks needs at least one candidate block")
    cache: dict[tuple[str, ...], float] = {}
    probes: list[tuple[tuple[str, ...], float]] = []

    def score(blocks: tuple[str, ...]) -> float:
        if blocks not in cache:
            cache[blocks] = float(evaluate(list(blocks)))
            probes.append((blocks, cache[blocks]))
        return cache[blocks]

    def meets(blocks: tuple[str, ...]) -> bool:
        value = score(blocks)
        return value >= target if higher_is_better else value <= target

    quantized, all_float = score(()), score(items)
    if meets(()):
        return BisectResult((), quantized, quantized, all_float, True, tuple(probes))
    if not meets(items):
        return BisectResult(items, all_float, quantized, all_float, False, tuple(probes))
    lo, hi = 1, len(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(items[:mid]):
            hi = mid
        else:
            lo = mid + 1
    end = hi
    lo, hi = 0, end - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if meets(items[mid:end]):
            lo = mid
        else:
            hi = mid - 1
    best = items[lo:end]
    return BisectResult(best, score(best), quantized, all_float, True, tuple(probes))


def block_patterns(model: nn.Module, depth: int | None = 1) -> list[str]:
    """Candidate blocks in graph order: op names cut to their first ``depth`` components (``None``: ops)."""
    names = [name for name, _ in iter_quant_ops(model)]
    if not names:
        names = [n.rpartition(".")[0] for n, _ in iter_fake_quantize(model)]
    blocks: list[str] = []
    for name in names:
        block = name if depth is None else ".".join(name.split(".")[:depth]).split("#")[0]
        if block not in blocks:
            blocks.append(block)
    return blocks


def bisect_model_blocks(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    target: float,
    depth: int | None = 1,
    candidates: Sequence[str] | None = None,
    higher_is_better: bool = True,
    fake_cast: bool = True,
) -> BisectResult:
    """:func:`bisect_float_blocks` on a prepared model: blocks run in float through :func:`float_ops`.

    Args:
        model: a calibrated (or QAT) network.
        eval_fn: ``eval_fn(model) -> metric``.
        target: the metric to reach.
        depth: block granularity for the default candidates (see :func:`block_patterns`).
        candidates: explicit block patterns in graph order.
        higher_is_better: direction of the metric.
        fake_cast: also turn off float16 fake cast inside the float blocks.
    """
    blocks = list(candidates) if candidates is not None else block_patterns(model, depth)

    def evaluate(selected: Sequence[str]) -> float:
        with float_ops(model, selected, fake_cast=fake_cast):
            return float(eval_fn(model))

    return bisect_float_blocks(blocks, evaluate, target, higher_is_better)
