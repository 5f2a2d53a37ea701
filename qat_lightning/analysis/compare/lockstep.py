"""Run a float (reference) forward and a quantized forward op-aligned, holding one activation at a time.

The per-layer comparison needs, for every op, the float and the quantized activation together; keeping
all float activations until the quantized run would hold a whole forward's worth of tensors. Instead the
two forwards run in two threads that take turns (a baton, so exactly one runs at any time): the reference
thread runs until its next op output, hands it over and pauses; the quantized thread runs until it needs
that op's activation, compares, and continues until it needs one the reference has not produced yet, then
hands the baton back. In an aligned run the two alternate op by op and at most one reference activation
is pending.

Because only one thread runs at a time, both may run the *same* module (single-model analysis: the float
reference is the prepared model with its quant nodes in FLOAT): ``on_ref`` / ``on_quant`` callbacks switch
the nodes' states (and the eager call-site counters, see :mod:`.layer_record`) whenever the baton changes
hands. Thread-local state (grad mode, torch function modes)
is set up inside each thread.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["Lockstep"]


class _Aborted(Exception):
    """Raised in a waiting thread when the other thread failed."""


class Lockstep:
    """Baton-passing runner for a reference and a quantized forward (see the module docstring).

    Args:
        on_ref: called in the reference thread each time it gets the baton (before it runs on).
        on_quant: called in the quantized thread each time it gets the baton.
    """

    def __init__(self, on_ref: Callable[[], None] | None = None, on_quant: Callable[[], None] | None = None):
        self._cv = threading.Condition()
        self._turn = "ref"
        self._on = {"ref": on_ref or (lambda: None), "quant": on_quant or (lambda: None)}
        self._pending: dict[Hashable, deque[Any]] = defaultdict(deque)
        self._local = threading.local()
        self.ref_done = False
        self.quant_done = False
        self._error: BaseException | None = None
        self.unmatched_ref: list[Hashable] = []

    # ------------------------------------------------------------------ roles
    @property
    def role(self) -> str | None:
        """``"ref"``, ``"quant"`` or ``None`` (a thread not started by this runner)."""
        return getattr(self._local, "role", None)

    def _wait_turn(self, me: str) -> None:
        while self._turn != me and self._error is None:
            self._cv.wait()
        if self._error is not None:
            raise _Aborted()
        self._on[me]()

    def _give(self, to: str) -> None:
        self._turn = to
        self._cv.notify_all()

    # ------------------------------------------------------------------ hooks
    def put(self, key: Hashable, value: Any) -> None:
        """Publish ``value`` for ``key`` (reference side) and let the quantized side run."""
        with self._cv:
            if self.quant_done:
                self.unmatched_ref.append(key)
                return
            self._pending[key].append(value)
            self._give("quant")
            self._wait_turn("ref")

    def take(self, key: Hashable) -> Any | None:
        """Quantized side: the reference value for ``key`` (``None`` if the reference never produces it)."""
        with self._cv:
            while not self._pending.get(key) and not self.ref_done:
                self._give("ref")
                self._wait_turn("quant")
            queue = self._pending.get(key)
            if queue:
                value = queue.popleft()
                if not queue:
                    del self._pending[key]
                return value
            return None

    def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Quantized side: let the reference run until ``predicate()`` holds or it has finished."""
        with self._cv:
            while not predicate() and not self.ref_done:
                self._give("ref")
                self._wait_turn("quant")

    # ------------------------------------------------------------------ driver
    def run(self, ref_call: Callable[[], Any], quant_call: Callable[[], Any]) -> tuple[Any, Any]:
        """Run both calls to completion; returns ``(ref output, quant output)``.

        Raises:
            Whatever either call raised (the other is stopped at its next hand-over).
        """
        results: dict[str, Any] = {}

        def body(me: str, other: str, call: Callable[[], Any]) -> None:
            self._local.role = me
            try:
                with self._cv:
                    self._wait_turn(me)
                with torch.no_grad():
                    results[me] = call()
            except _Aborted:
                return
            except BaseException as err:  # noqa: BLE001 - re-raised by the driver
                with self._cv:
                    if self._error is None:
                        self._error = err
                    self._cv.notify_all()
                return
            with self._cv:
                setattr(self, f"{me}_done", True)
                self._give(other)

        threads = [
            threading.Thread(target=body, args=("ref", "quant", ref_call), name="qa-ref", daemon=True),
            threading.Thread(target=body, args=("quant", "ref", quant_call), name="qa-quant", daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._error is not None:
            raise self._error
        self.unmatched_ref.extend(k for k, q in self._pending.items() for _ in q)
        self._pending.clear()
        return results["ref"], results["quant"]
