"""search_probes: smallest_ok against brute force, row energies, the first-order guess."""

from __future__ import annotations

import math
import random

import pytest

from qat_lightning.analysis.search.probes import FirstOrderGuess, row_energy, smallest_ok
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable


@pytest.mark.parametrize("seed", range(40))
def test_smallest_ok_equals_brute_force_with_and_without_guess(seed: int) -> None:
    rng = random.Random(seed)
    lo = rng.choice([-1, 0, 3])
    hi = lo + rng.randint(1, 70)
    boundary = rng.randint(lo + 1, hi)  # monotone: ok from boundary on
    calls: list[int] = []

    def ok_at(k: int) -> bool:
        assert lo < k <= hi, "probed outside (lo, hi]"
        calls.append(k)
        return k >= boundary

    assert smallest_ok(lo, hi, ok_at) == boundary
    bisection = len(calls)
    for guess in (None, lo - 5, lo, lo + 1, boundary - 1, boundary, boundary + 1, hi - 1, hi, hi + 9):
        calls.clear()
        assert smallest_ok(lo, hi, ok_at, guess) == boundary
        assert len(calls) <= 3 * bisection + 2  # a useless guess: at most two extra probes per halving
    for noise in (-7, -1, 0, 2, 11):  # a guess asked again after every probe
        assert smallest_ok(lo, hi, ok_at, lambda a, b, noise=noise: boundary + noise) == boundary
    calls.clear()
    if lo < boundary - 1:
        smallest_ok(lo, hi, ok_at, boundary)
        assert calls[:2] == [boundary, boundary - 1] and len(calls) == 2  # a right guess: two probes
    assert bisection <= math.ceil(math.log2(hi - lo)) + 1


def test_row_energy_is_additive_per_metric() -> None:
    assert row_energy("MSE", 0.5) == 0.5
    assert row_energy("1-COSINE", -1e-9) == 0.0
    assert row_energy("-SQNR", -20.0) == pytest.approx(0.01)  # 20 dB: error energy 1 % of the signal
    assert row_energy("L1", 0.3) == pytest.approx(0.09)
    assert math.isinf(row_energy("L1", math.nan))


def _table(values: dict[str, float], name: str = "MSE") -> SensitivityTable:
    rows = tuple(
        SensitivityRow(op, "activation", "Linear", v, "qint8", 1, 0.1)
        for op, v in sorted(values.items(), key=lambda kv: -kv[1])
    )
    return SensitivityTable(rows, name)


def test_first_order_guess_interpolates_in_the_energy_left() -> None:
    table = _table({"a": 6.0, "b": 3.0, "c": 1.0})
    guess = FirstOrderGuess([table], [list(table.rows)])
    rows_all = [(r.op_name, r.sensitive_type) for r in table.rows]
    guess.observe([], 0.0)
    guess.observe(rows_all, 1.0)
    assert guess.residual([]) == pytest.approx(1.0)
    assert guess.predicted([("a", "activation")]) == pytest.approx(0.6)
    rows_at = [[], [("a", "activation")], [("a", "activation"), ("b", "activation")]]
    assert guess.first(0, 3, rows_at.__getitem__, lambda m: m >= 0.55) == 1
    assert guess.first(0, 3, rows_at.__getitem__, lambda m: m >= 0.95) == 3  # only k = 3 (known) meets it
    guess.observe(rows_at[1], 0.9)  # measured better than predicted: the nearest points take over
    assert guess.predicted(rows_at[2]) == pytest.approx(0.9 + 0.1 * 0.3 / 0.4)
    nan = _table({"a": math.nan, "b": 1.0})
    g = FirstOrderGuess([nan], [list(nan.rows)])
    g.observe([], 0.0)
    g.observe([("a", "activation"), ("b", "activation")], 1.0)
    assert math.isnan(
        g.predicted([("b", "activation")])
    )  # a NaN row left in low: no prediction meets a target
