"""Stable op names shared by the fx and eager paths (:class:`OpNamer`); re-exported by ``tables``."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["OpNamer"]


class OpNamer:
    """Stable op names.

    * A module op is named by its module path; the k-th extra call of the same module gets ``path#k``.
    * A functional op / operator is ``<parent path>.<base>`` (``<base>`` at the root), numbered
      ``<base>``, ``<base>_1``, ``<base>_2`` in call order within one call of its parent module; inside
      the k-th extra call of a shared parent the name gets ``#k`` (``block.add#1``).
    * A model input is ``<argument name>_quant``.

    ``taken`` holds names that already exist as attributes (``parent -> set of child names``); a functional
    name that would clash gets the next free number.
    """

    def __init__(self, taken: Callable[[str, str], bool] | None = None) -> None:
        self._module_calls: dict[str, int] = {}
        self._fn_counts: dict[tuple[str, int, str], int] = {}
        self._taken = taken or (lambda parent, child: False)
        self.used: set[str] = set()

    def module_op(self, path: str) -> tuple[str, int]:
        """Name and call index of the next call of module ``path``."""
        k = self._module_calls.get(path, 0)
        self._module_calls[path] = k + 1
        name = path if k == 0 else f"{path}#{k}"
        self.used.add(name)
        return name, k

    def function_op(self, parent: str, parent_call: int, base: str) -> str:
        """Name of the next ``base`` functional op called by ``parent`` (in its ``parent_call``-th call)."""
        key = (parent, parent_call, base)
        j = self._fn_counts.get(key, 0)
        while True:
            child = base if j == 0 else f"{base}_{j}"
            full = f"{parent}.{child}" if parent else child
            if parent_call:
                full = f"{full}#{parent_call}"
            j += 1
            if parent_call or not self._taken(parent, child):
                break
        self._fn_counts[key] = j
        self.used.add(full)
        return full

    def input_op(self, arg_name: str) -> str:
        """Name of the quant point of model input ``arg_name``."""
        name = f"{arg_name}_quant"
        while name in self.used or self._taken("", name):
            name = f"{name}_"
        self.used.add(name)
        return name
