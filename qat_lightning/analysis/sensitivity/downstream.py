"""Run only the part of an fx graph downstream of some nodes, from cached float activations.

Exact sensitivity enables one op's quant node(s) and compares the model output with the float output.
Everything upstream of that op is unchanged (all other nodes are FLOAT), so :class:`GraphSlicer` runs
the float graph once, caches every node's value (:meth:`GraphSlicer.cache`), and then, per op,
re-executes only the op's node(s) and the nodes reachable from them through their users, in graph order,
reading every other input from the cache (:meth:`GraphSlicer.run_downstream`). The result is the same
computation the full forward would do, node for node, so it matches a full forward of the model.

Details:

* A start node can be given its new value directly (``overrides``): an op whose only enabled node is
  its output node needs no recomputation, its new output is that node applied to the cached output.
* Index ops (see :mod:`qat_lightning.analysis.compare.index_ops`) are recorded per node during the cached
  run and   replayed per node, so a slice replays exactly what a full quantized run would.
* In-place mutation breaks caching (a later node may change a cached tensor). The cached run checks
  every cached tensor's version counter; if any was mutated :attr:`GraphSlicer.safe` is False (and
  :attr:`mutated` names the nodes) and callers must fall back to full forwards.
* An op module that is not itself a ``call_module`` node (it lives inside a leaf module) is started from
  the innermost enclosing ``call_module`` node.
* A module reachable at several paths (a weight quant node shared by the call sites ``fc`` and ``fc#1`` of
  one ``nn.Linear``, an activation op shared by two leaf blocks) runs wherever any of its paths runs:
  :meth:`GraphSlicer.start_nodes_of` starts from every ``call_module`` node of every path, so no call of a
  changed module is read from the cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn
from torch.fx.node import Node, map_arg

from qat_lightning.analysis.compare.index_ops import IndexRecord, IndexRecorder, IndexReplayer
from qat_lightning.analysis.inputs import ModelInputs

__all__ = ["FloatCache", "GraphSlicer", "leaf_tensors"]


@dataclass
class FloatCache:
    """Every node's value from one float run, the per-node index records and the output."""

    values: dict[Node, Any]
    index_records: dict[Node, list[IndexRecord]] = field(default_factory=dict)
    output: Any = None


def leaf_tensors(value: Any) -> list[Tensor]:
    """Return the tensors in ``value`` (a tensor or nested tuples, lists and dicts of them), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in leaf_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in leaf_tensors(v)]
    return []


class GraphSlicer:
    """Executes an fx ``GraphModule`` node by node, fully or downstream of given nodes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[Node] = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output_node = next(n for n in self.nodes if n.op == "output")
        self.safe = True
        self.mutated: list[str] = []
        self._downstream: dict[tuple[Node, ...], list[Node]] = {}
        self._paths: dict[int, list[str]] | None = None

    # ------------------------------------------------------------------ execution
    def _bind(self, inputs: ModelInputs) -> dict[Node, Any]:
        env: dict[Node, Any] = {}
        args = () if isinstance(inputs, dict) else tuple(inputs)
        kwargs = inputs if isinstance(inputs, dict) else {}
        for i, node in enumerate(self.placeholders):
            name = str(node.target)
            if name.startswith("*"):
                env[node] = tuple(args[i:])
            elif i < len(args):
                env[node] = args[i]
            elif name in kwargs:
                env[node] = kwargs[name]
            elif node.args:
                env[node] = node.args[0]
            else:
                raise ValueError(f"missing model input {name!r}")
        return env

    def _exec(self, node: Node, lookup: Any) -> Any:
        args = map_arg(node.args, lookup)
        kwargs = map_arg(node.kwargs, lookup)
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        if node.op == "get_attr":
            value: Any = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        raise RuntimeError(f"cannot execute fx node {node.format_node()}")

    def cache(self, inputs: ModelInputs, record_index: bool = True) -> FloatCache:
        """Run the whole graph (in the model's current quant state) and keep every node's value.

        ``record_index=False`` skips the index-op recording (a plain run, node for node the forward).
        """
        values = self._bind(inputs)
        records: dict[Node, list[IndexRecord]] = {}
        versions: dict[Node, list[int]] = {}
        for node in self.nodes:
            if node.op in ("placeholder", "output"):
                continue
            recorder = IndexRecorder() if record_index else None
            with recorder if recorder is not None else nullcontext():
                values[node] = self._exec(node, values.__getitem__)
            if recorder is not None and recorder.records:
                records[node] = recorder.records
            versions[node] = [t._version for t in leaf_tensors(values[node])]
        output = map_arg(self.output_node.args[0], values.__getitem__)
        self.mutated = [
            n.name for n, v in versions.items() if [t._version for t in leaf_tensors(values[n])] != v
        ]
        self.safe = not self.mutated
        return FloatCache(values, records, output)

    # ------------------------------------------------------------------ slices
    def start_nodes(self, module_name: str) -> list[Node]:
        """Return the ``call_module`` nodes running ``module_name`` (or the innermost enclosing one)."""
        exact = [n for n in self.nodes if n.op == "call_module" and n.target == module_name]
        if exact:
            return exact
        best: list[Node] = []
        best_len = -1
        for n in self.nodes:
            target = str(n.target)
            if n.op == "call_module" and module_name.startswith(target + ".") and len(target) >= best_len:
                if len(target) > best_len:
                    best, best_len = [], len(target)
                best.append(n)
        return best

    def module_paths(self, module: nn.Module) -> list[str]:
        """Return every path at which ``module`` is reachable in the graph module (a shared one: several)."""
        if self._paths is None:
            self._paths = {}
            for path, mod in self.gm.named_modules(remove_duplicate=False):
                self._paths.setdefault(id(mod), []).append(path)
        return self._paths.get(id(module), [])

    def start_nodes_of(self, modules: Iterable[nn.Module]) -> list[Node]:
        """Return the ``call_module`` nodes that run any of ``modules`` at any of its paths, in graph order.

        A module shared by several parents (one weight quant node under ``fc`` and ``fc#1``) gives the nodes
        of all of them: :meth:`start_nodes` of one path alone would leave the other calls cached.
        """
        found = {n for m in modules for path in self.module_paths(m) for n in self.start_nodes(path)}
        return sorted(found, key=self.position.__getitem__)

    def downstream(self, starts: Iterable[Node]) -> list[Node]:
        """Return ``starts`` and every node reachable from them through users, in graph order (no output)."""
        key = tuple(sorted(starts, key=self.position.__getitem__))
        found = self._downstream.get(key)
        if found is None:
            seen: set[Node] = set()
            stack = list(key)
            while stack:
                node = stack.pop()
                if node in seen or node.op == "output":
                    continue
                seen.add(node)
                stack.extend(node.users)
            found = sorted(seen, key=self.position.__getitem__)
            self._downstream[key] = found
        return found

    def run_downstream(
        self, cache: FloatCache, starts: Iterable[Node], overrides: dict[Node, Any] | None = None
    ) -> Any:
        """Return the graph output when only ``starts`` and their downstream nodes are recomputed.

        Args:
            cache: from :meth:`cache`.
            starts: the nodes whose quantization changed.
            overrides: new values of some start nodes, used instead of executing them (e.g. the cached
                float output passed through the op's output quant node).
        """
        local = self.run_nodes(cache.values, starts, overrides, cache.index_records)
        if not local:
            return cache.output
        return self.output_of(local, cache.values)

    def run_nodes(
        self,
        values: dict[Node, Any],
        starts: Iterable[Node],
        overrides: dict[Node, Any] | None = None,
        index_records: dict[Node, list[IndexRecord]] | None = None,
    ) -> dict[Node, Any]:
        """Execute ``starts`` and the downstream nodes that read a new value; return the new values.

        Every other input is read from ``values`` (a cached run); ``index_records`` are replayed per node.
        """
        starts = list(starts)
        local: dict[Node, Any] = {}
        overrides = overrides or {}
        records_of = index_records or {}

        def lookup(n: Node) -> Any:
            return local[n] if n in local else values[n]

        start_set = set(starts)
        for node in self.downstream(starts):
            if node not in start_set and not any(p in local for p in node.all_input_nodes):
                continue
            if node in overrides:
                value = overrides[node]
            else:
                records = records_of.get(node)
                with IndexReplayer(records) if records else nullcontext():
                    value = self._exec(node, lookup)
            local[node] = value
        return local

    def output_of(self, local: dict[Node, Any], values: dict[Node, Any]) -> Any:
        """Return the graph output from new values ``local`` over cached ``values``."""
        return map_arg(self.output_node.args[0], lambda n: local[n] if n in local else values[n])

    def bind(self, inputs: ModelInputs) -> dict[Node, Any]:
        """Return the placeholders' values for the model inputs (positional tuple or keyword dict)."""
        return self._bind(inputs)
