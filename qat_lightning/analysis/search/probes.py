"""Probe machinery of the mixed-precision searches: evaluation, the boundary search, the first-order guess.

* :class:`ProbeRunner` raises rows in place, evaluates ``eval_fn`` (inside
  :func:`~qat_lightning.ptq.float_reference`: after AdaRound a raised weight quantizes its original float
  weight, an op kept in float runs it) and restores every dtype and scale;
  identical assignments are evaluated once;
* :func:`smallest_ok` finds the smallest count meeting the target between a failing and a passing one:
  by bisection (``exact``) or, given a guess, by probing the guess and galloping away from it
  (``fast``), then checking below the count found (a pass there shows the metric is not monotone and
  the search goes on below); when the probes contradict monotonicity or the first guess was off by more
  than :data:`GUESS_FACTOR`, the fast search then follows bisection's path too (known counts are free,
  it stops once bisection could only do worse) and keeps the smaller count, so it never returns more
  than bisection there. Both return the same count whenever the metric does not get worse when more
  rows are raised (the searches' assumption), the fast one in fewer probes when the guess is close;
* :class:`FirstOrderGuess` predicts where the boundary lies from the sensitivity tables' own numbers:
  each row's error value is turned into an additive error energy (``MSE`` and ``1-COSINE`` are
  proportional to the squared output error, ``-SQNR`` is ``10 log10`` of it, ``L1`` and the others
  are proportional to its square root), the energy left in ``low`` is summed, and the metric is
  interpolated linearly in that energy between the nearest probes measured so far on either side
  (at first the all-low and the all-raised probes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from numbers import Real
from typing import Any

from torch import Tensor, nn

from qat_lightning.analysis.search.precision_nodes import (
    apply_chip_rules,
    assignment_cost,
    collect_ops,
    raise_assignment,
)
from qat_lightning.analysis.search.probe_cache import ActivationReuse
from qat_lightning.analysis.search.result import Probe
from qat_lightning.analysis.state import analysis_mode, node_dtypes
from qat_lightning.chips import get_chip
from qat_lightning.ptq.float_reference import float_reference
from qat_lightning.quant.dtypes import QuantDtype
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable

__all__ = ["GUESS_FACTOR", "ProbeRunner", "smallest_ok", "FirstOrderGuess", "probe_metric", "row_energy"]

Row = tuple[str, str]


def probe_metric(value: Any, stage: str, raised: int, target: float) -> float:
    """Return what ``eval_fn`` returned at a probe as a float: a real number or a one-element tensor.

    Raises:
        TypeError: for anything else (``None``, a string, a tensor of several values).
        ValueError: for NaN, naming the probe: it can be neither compared with the target nor ranked.
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.detach().reshape(()).item()
    if not isinstance(value, Real):
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)[:60]
        raise TypeError(f"eval_fn must return a number (e.g. accuracy), got {shown} at probe {stage!r}")
    metric = float(value)
    if math.isnan(metric):
        raise ValueError(
            f"eval_fn returned nan at probe {stage!r} ({raised} row{'' if raised == 1 else 's'} raised): the "
            f"search compares the metric with the target {target:g} and cannot compare nan; check eval_fn "
            "(an empty validation set, a division by zero) or the model under this assignment"
        )
    return metric


class ProbeRunner:
    """Evaluates assignments of raised rows: ``eval_fn`` under changed node dtypes, then restored.

    With ``reuse`` (:class:`~qat_lightning.analysis.search.probe_cache.ActivationReuse`) the model's
    forwards during ``eval_fn`` run only downstream of the changed ops, from kept activations.

    ``notes`` collects the search's remarks (e.g. a metric that is not monotone), never the chip
    downgrades of a probe: a plan's downgrades are those of its own assignment
    (:meth:`assignment_notes`, :meth:`chip_rules`), not of the probes on the way to it.
    """

    def __init__(
        self,
        model: nn.Module,
        eval_fn: Callable[[nn.Module], float],
        target: float,
        higher_is_better: bool,
        base: Mapping[FakeQuantize, QuantDtype],
        chip: str | None,
        on_probe: Callable[[Probe], None] | None = None,
        reuse: ActivationReuse | None = None,
    ) -> None:
        self.model = model
        self.reuse = reuse
        self.eval_fn = eval_fn
        self.target = target
        self.higher = higher_is_better
        self.ops = collect_ops(model)
        self.base = dict(base)
        self.chip = chip
        self.spec = get_chip(chip) if chip is not None else None
        self.probes: list[Probe] = []
        self.notes: list[str] = []
        self.on_probe = on_probe
        self.cache: dict[tuple, tuple[float, float]] = {}

    def ok(self, metric: float) -> bool:
        """Whether ``metric`` meets the target (NaN never does)."""
        if math.isnan(metric):
            return False
        return metric >= self.target if self.higher else metric <= self.target

    def better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` is better than ``b``."""
        if math.isnan(b):
            return not math.isnan(a)
        return a > b if self.higher else a < b

    def assignment(self, rows: Sequence[Row], high: QuantDtype) -> dict[FakeQuantize, QuantDtype]:
        """Node dtypes after raising ``rows`` over the base, then the chip rules."""
        return raise_assignment(list(rows), self.ops, high, self.base, self.spec)[0]

    def assignment_notes(self, rows: Sequence[Row], high: QuantDtype) -> list[str]:
        """Return the chip's downgrades in the assignment of ``rows`` (what the plan's setter logs)."""
        return raise_assignment(list(rows), self.ops, high, self.base, self.spec)[1]

    def follow_chip(self, dtypes: Mapping[FakeQuantize, QuantDtype]) -> dict[FakeQuantize, QuantDtype]:
        """Return ``dtypes`` after the chip's rules, as the plan's setter applies them."""
        return self.chip_rules(dtypes)[0]

    def chip_rules(
        self, dtypes: Mapping[FakeQuantize, QuantDtype]
    ) -> tuple[dict[FakeQuantize, QuantDtype], list[str]]:
        """Return ``dtypes`` after the chip's rules and one note per downgrade they made."""
        fixed = dict(dtypes)
        notes = apply_chip_rules(self.ops, fixed, self.spec) if self.spec is not None else []
        return fixed, notes

    def measure(
        self,
        stage: str,
        dtypes: Mapping[FakeQuantize, QuantDtype],
        ratio: float,
        counts: tuple[int, ...],
        raised: int,
    ) -> Probe:
        """Evaluate the model under ``dtypes`` (always a new evaluation) and record the probe."""
        cost = assignment_cost(self.ops, dtypes, self.chip)
        serving = self.reuse.serving() if self.reuse is not None else nullcontext()
        with node_dtypes(dict(dtypes)), analysis_mode(self.model), float_reference(self.model), serving:
            value = self.eval_fn(self.model)
        metric = probe_metric(value, stage, raised, self.target)
        probe = Probe(stage, ratio, counts, metric, cost, raised, self.ok(metric))
        self.probes.append(probe)
        if self.on_probe is not None:
            self.on_probe(probe)
        return probe

    def evaluate(
        self, stage: str, rows: Sequence[Row], high: QuantDtype, ratio: float, counts: tuple[int, ...]
    ) -> Probe:
        """Evaluate ``rows`` raised to ``high``; an assignment seen before is not evaluated again."""
        dtypes = self.assignment(rows, high)
        key = tuple(sorted((id(n), d.name) for n, d in dtypes.items()))
        cached = self.cache.get(key)
        if cached is not None:
            metric, cost = cached
            return Probe(stage, ratio, counts, metric, cost, len(set(rows)), self.ok(metric))
        probe = self.measure(stage, dtypes, ratio, counts, len(set(rows)))
        self.cache[key] = (probe.metric, probe.cost)
        return probe


GUESS_FACTOR = 2.0
"""Factor between the first guess and the count found beyond which the fast search follows bisection too."""


def smallest_ok(
    lo: int,
    hi: int,
    ok_at: Callable[[int], bool],
    guess: int | Callable[[int, int], int | None] | None = None,
    report: Callable[[str, int, int], None] | None = None,
) -> int:
    """Return the smallest ``k`` in ``(lo, hi]`` with ``ok_at(k)``, given ``ok_at(hi)`` holds.

    ``lo`` fails (or lies below the range: ``lo = start - 1``). Without a guess: bisection. With one (a
    count, or ``guess(lo, hi)`` asked again after every probe), the guess clipped into ``(lo, hi)`` is
    probed instead of the middle (a guess at ``hi`` probes ``hi - 1``: the neighbour that confirms the
    boundary); after a guessed probe that did not halve the interval, the next probe is the middle
    unless the guess only checks a neighbour of a bound, so a poor guess costs a bounded number of extra
    probes. No count is probed twice.

    With a guess, the count ``k`` found is then checked below: the point ``m = (lo + k) // 2`` that
    bisection would look at is probed. If it fails, ``k`` stands; if it passes, the metric is not
    monotone there (a count above ``m`` failed), so the search goes on in ``(largest failing count
    below m, m]`` (with the guess again) and the new ``k`` is checked the same way. The check stops at a
    failing point or at one already probed (its known result is used; a known pass continues the
    search without a new probe). On a monotone metric this costs at most one probe more than the guessed
    search alone (exactly one unless ``m`` was already probed or ``k = lo + 1``).

    Then the guessed result is distrusted, and bisection's own path over ``(lo, hi]`` is followed
    (:func:`_bisect_below`: known counts cost nothing, and it stops as soon as bisection could only
    return ``k`` or more), keeping the smaller count, when either

    * the probes contradict monotonicity: a count passed below a failing one, or
    * the first guess (clipped into ``(lo, hi]``) and ``k``, both measured from ``lo``, differ by more
      than :data:`GUESS_FACTOR` (the first-order model did not predict this metric).

    In that case the count returned is never above bisection's, whatever the metric. ``report(reason, k,
    found)`` is called when that happens. Without a guess (bisection) there is neither check nor
    fallback: every probe lies between the largest failing and the smallest passing count seen, so
    bisection never meets a pass below a fail.
    """
    predict = None if guess is None else guess if callable(guess) else (lambda _lo, _hi: guess)
    if predict is None:
        return _narrow(lo, hi, ok_at, None)
    known: dict[int, bool] = {}

    def probe(k: int) -> bool:
        if k not in known:
            known[k] = ok_at(k)
        return known[k]

    g = predict(lo, hi)
    first = hi if g is None else min(max(g, lo + 1), hi)
    k = _check_below(lo, _narrow(lo, hi, probe, predict), probe, predict, known)
    reason = _distrust(lo, first, k, known)
    if reason is None:
        return k
    found = _bisect_below(lo, hi, probe, k)
    if report is not None:
        report(reason, k, found)
    return found


def _check_below(
    lo: int,
    k: int,
    probe: Callable[[int], bool],
    predict: Callable[[int, int], int | None],
    known: Mapping[int, bool],
) -> int:
    """Check below ``k`` (:func:`smallest_ok`): probe bisection's next point, search below while it passes."""
    while True:
        m = (lo + k) // 2
        if m <= lo or not probe(m):
            return k
        below = max((c for c, ok in known.items() if not ok and c < m), default=lo)
        k = _narrow(below, m, probe, predict)


def _distrust(lo: int, first: int, k: int, known: Mapping[int, bool]) -> str | None:
    """Why the guessed result ``k`` is not trusted (:func:`smallest_ok`'s two rules), or ``None``."""
    passes = [c for c, ok in known.items() if ok]
    fails = [c for c, ok in known.items() if not ok]
    if passes and fails and min(passes) < max(fails):
        return f"metric not monotone (count {min(passes)} passes, {max(fails)} fails)"
    a, b = first - lo, k - lo
    if b > GUESS_FACTOR * a or a > GUESS_FACTOR * b:
        return f"first guess {first} off by more than x{GUESS_FACTOR:g} from the count found {k}"
    return None


def _bisect_below(lo: int, hi: int, ok_at: Callable[[int], bool], best: int) -> int:
    """``min(best, bisection's result over (lo, hi])``, stopping once that result can only be ``>= best``."""
    while hi - lo > 1 and lo + 1 < best:
        mid = (lo + hi) // 2
        if ok_at(mid):
            hi = mid
        else:
            lo = mid
    return min(hi, best)


def _narrow(
    lo: int, hi: int, ok_at: Callable[[int], bool], predict: Callable[[int, int], int | None] | None
) -> int:
    """Search between a failing ``lo`` and a passing ``hi`` (:func:`smallest_ok` without its check below)."""
    misses = 0  # guessed probes in a row that did not halve the interval
    while hi - lo > 1:
        width, mid = hi - lo, (lo + hi) // 2
        g = predict(lo, hi) if predict is not None else None
        k = mid if g is None else min(max(g, lo + 1), hi - 1)
        if misses >= 2 or (misses == 1 and k not in (lo + 1, hi - 1)):
            k = mid  # after a guess that did not halve: bisect, unless it only checks a neighbour once
        if ok_at(k):
            hi = k
        else:
            lo = k
        misses = 0 if k == mid or hi - lo <= width // 2 else misses + 1
    return hi


def row_energy(metric_name: str, value: float) -> float:
    """Turn a table's error value into a quantity additive over rows (module docstring)."""
    if math.isnan(value):
        return math.inf
    name = metric_name.upper()
    if name in ("MSE", "1-COSINE"):
        return max(value, 0.0)
    if name == "-SQNR":
        return 10.0 ** (value / 10.0) if value < 3000 else math.inf
    return max(value, 0.0) ** 2


class FirstOrderGuess:
    """Predicts the metric of an assignment from the tables' error values (module docstring)."""

    def __init__(
        self, tables: Sequence[SensitivityTable], per_table: Sequence[Sequence[SensitivityRow]]
    ) -> None:
        self.energy: list[dict[Row, float]] = []
        for table, rows in zip(tables, per_table, strict=True):
            values = {(r.op_name, r.sensitive_type): row_energy(table.metric_name, r.metric) for r in rows}
            finite = sum(v for v in values.values() if math.isfinite(v))
            self.energy.append(
                {k: (v / finite if finite > 0 and math.isfinite(v) else v) for k, v in values.items()}
            )
        self.points: list[tuple[float, float]] = []  # (residual, metric) of every probe seen

    def observe(self, raised: Sequence[Row], metric: float) -> None:
        """Record a measured probe (NaN metrics are ignored)."""
        r = self.residual(raised)
        if not math.isnan(metric) and math.isfinite(r):
            self.points.append((r, metric))

    def residual(self, raised: Sequence[Row]) -> float:
        """Share of the estimated error energy left in ``low`` (mean over tables; ``inf``: a NaN row left)."""
        chosen = set(raised)
        parts = [sum(v for k, v in e.items() if k not in chosen) for e in self.energy if e]
        return sum(parts) / len(parts) if parts else 0.0

    def predicted(self, raised: Sequence[Row]) -> float:
        """Predict the metric: linear in :meth:`residual` between the nearest measured probes."""
        r = self.residual(raised)
        below = [p for p in self.points if p[0] <= r]
        above = [p for p in self.points if p[0] >= r]
        if not below or not above:
            return math.nan
        (r0, m0), (r1, m1) = max(below), min(above)
        return m0 if r1 <= r0 else m0 + (m1 - m0) * (r - r0) / (r1 - r0)

    def first(
        self, lo: int, hi: int, rows_at: Callable[[int], Sequence[Row]], ok: Callable[[float], bool]
    ) -> int:
        """Return the smallest ``k`` in ``(lo, hi]`` whose predicted metric meets the target (else ``hi``)."""
        left, right = lo, hi  # predicted residual falls with k: bisect on the prediction, no evaluation
        while right - left > 1:
            mid = (left + right) // 2
            if ok(self.predicted(rows_at(mid))):
                right = mid
            else:
                left = mid
        return right
