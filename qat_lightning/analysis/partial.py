"""Partial quantization in plain torch (the seed's last-resort locator): run chosen ops in float, bisect.

* :func:`matched_nodes` resolves op-name patterns (:func:`~qat_lightning.quant.op_names.match_name`: a
  prefix on name components or a glob) to the ops and their quant nodes;
* :func:`float_ops` runs the matched ops in float inside a ``with`` block and restores every node's own
  state (``switch_to_float`` / ``restore_states`` are its two halves, for callers that switch per batch);
* :func:`bisect_float_blocks` is the seed's "binary search to narrow down the scope": on plain callables,
  the smallest contiguous run of blocks whose float execution brings the metric back to a target;
  :func:`bisect_model_blocks` wires it to a prepared model and an ``eval_fn(model) -> float``, inside
  :func:`qat_lightning.ptq.float_reference`: after AdaRound / bias correction a block in float runs its
  original float parameters (``float_ops`` alone does not enter it: code training inside the block would
  get no gradient for the float blocks' parameters there).

The Lightning adapter is :class:`qat_lightning.callbacks.FakeQuantSwitch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from qat_lightning.analysis.checks import check_count
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, iter_fake_quantize
from qat_lightning.quant.op_names import match_name
from qat_lightning.quant.ops import iter_quant_ops, quant_nodes_of

__all__ = [
    "BisectResult",
    "bisect_float_blocks",
    "bisect_model_blocks",
    "block_patterns",
    "float_ops",
    "match_name",
    "matched_nodes",
    "restore_states",
    "switch_to_float",
]


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


def switch_to_float(nodes: Sequence[FakeQuantize]) -> list[tuple[FakeQuantize, FakeQuantState]]:
    """Set ``nodes`` to ``FLOAT``; returns each node's previous state for :func:`restore_states`."""
    saved = [(node, node.state) for node in nodes]
    for node in nodes:
        node.state = FakeQuantState.FLOAT
    return saved


def restore_states(saved: Sequence[tuple[FakeQuantize, FakeQuantState]]) -> None:
    """Give every node back the state :func:`switch_to_float` saved (latest first)."""
    for node, state in reversed(saved):
        node.state = state


@contextmanager
def float_ops(model: nn.Module, patterns: Sequence[str], fake_cast: bool = True) -> Iterator[list[str]]:
    """Run the matched ops in float inside the block; every node's own state is restored on exit.

    Yields:
        The matched op names.
    """
    names, nodes, _ = matched_nodes(model, list(patterns), fake_cast)
    saved = switch_to_float(nodes)
    try:
        yield names
    finally:
        restore_states(saved)


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
    """Candidate blocks in graph order: op names cut to their first ``depth`` components (``None``: ops).

    Raises:
        ValueError: for a ``depth`` below 1 (no block level: every op would vanish or fall into ``""``).
        TypeError: for a ``depth`` that is not an int or ``None``.
    """
    check_count("depth", depth, "block_patterns", allow_none=True)
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

    Every evaluation runs inside :func:`qat_lightning.ptq.float_reference`: after AdaRound / bias correction
    the blocks in float run the original float parameters (the others as calibrated), so ``float_metric`` is
    the float model's. ``eval_fn`` must only evaluate (parameters of ops in float get no gradient there).

    Args:
        model: a calibrated (or QAT) network.
        eval_fn: ``eval_fn(model) -> metric``.
        target: the metric to reach.
        depth: block granularity for the default candidates (see :func:`block_patterns`; checked even
            with ``candidates``).
        candidates: explicit block patterns in graph order.
        higher_is_better: direction of the metric.
        fake_cast: also turn off float16 fake cast inside the float blocks.

    Raises:
        ValueError: for a ``depth`` below 1.
        TypeError: for a ``depth`` that is not an int or ``None``.
    """
    check_count("depth", depth, "bisect_model_blocks", allow_none=True)
    blocks = list(candidates) if candidates is not None else block_patterns(model, depth)

    def evaluate(selected: Sequence[str]) -> float:
        with float_ops(model, selected, fake_cast=fake_cast):
            return float(eval_fn(model))

    with float_reference(model):
        return bisect_float_blocks(blocks, evaluate, target, higher_is_better)
