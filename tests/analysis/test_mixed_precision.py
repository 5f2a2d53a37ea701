"""search_mixed_precision: target at the minimal ratio, model restored, chip rules, fp16/J6P helpers."""

from __future__ import annotations

import json

import pytest
import torch
from analysis_toys import QInput, QLinear, calibrated, data

import qat_lightning as ql
from qat_lightning.analysis import (
    QuantAnalysis,
    SearchReporter,
    search_fp16_topk,
    search_j6p,
    search_mixed_precision,
)
from qat_lightning.analysis.search.precision_nodes import apply_chip_rules, collect_ops, raise_assignment
from qat_lightning.analysis.search.precision_paths import j6p_base_dtypes
from qat_lightning.analysis.state import node_dtypes
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable


def _setup(outputs: str = "single"):
    model = calibrated(outputs=outputs)
    x = data(64, 3)
    model.eval()
    with torch.no_grad(), ql.fake_quant_disabled(model):
        ref = model(x)
    ref0 = ref if isinstance(ref, torch.Tensor) else (ref[0] if isinstance(ref, tuple) else ref["cls"])
    calls = []

    def eval_fn(m: torch.nn.Module) -> float:
        calls.append(1)
        with torch.no_grad():
            out = m(x)
        out0 = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, tuple) else out["cls"])
        return float(torch.nn.functional.cosine_similarity(out0.flatten(), ref0.flatten(), dim=0))

    return model, x, eval_fn, calls


def _snapshot(model: torch.nn.Module) -> list:
    return [(n.dtype, n.state, n.scale.clone()) for _, n in ql.iter_fake_quantize(model)]


def _same(a: list, b: list) -> bool:
    return all(x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))


def test_reaches_target_with_the_broken_op_raised_at_the_minimal_ratio(tmp_path) -> None:
    model, x, eval_fn, calls = _setup()
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    assert table.rows[0].op_name == "big"
    before = _snapshot(model)
    # brute force: the metric with the top-k rows raised, k = 0..n
    ops = collect_ops(model)
    by_k = []
    for k in range(len(table.rows) + 1):
        rows = [(r.op_name, r.sensitive_type) for r in table.rows[:k]]
        with node_dtypes(raise_assignment(rows, ops, ql.qint16)[0]):
            by_k.append(eval_fn(model))
    target = by_k[3] - 1e-9
    minimal = next(k for k, v in enumerate(by_k) if v >= target)
    calls.clear()
    reporter = SearchReporter(tmp_path)
    plan = reporter.write(
        search_mixed_precision(model, table, eval_fn, target, method="exact", on_probe=reporter.probe)
    )
    assert plan.reached and ("big", "activation") in plan.raised
    assert len(plan.raised) == minimal and plan.ratio == pytest.approx(minimal / len(table.rows))
    assert plan.metric == pytest.approx(by_k[minimal]) and plan.metric >= target
    assert len(calls) == len(plan.probes) <= 2 + 4  # baseline, all-high, then a binary search
    assert [p.stage for p in plan.probes[:2]] == ["baseline", "all_high"]
    assert _same(before, _snapshot(model))  # every dtype, state and scale restored
    assert plan.cost_low < plan.cost < plan.cost_high
    # the setter reproduces the plan on the op level
    qconfigs = plan.setter.assign([op.op_info for _, op in ql.iter_quant_ops(model)]).qconfigs
    assert qconfigs["big"].output_dtype == ql.qint16
    assert all(
        qconfigs[n].output_dtype == ql.qint8 for n in ("quant", "fc2") if (n, "activation") not in plan.raised
    )
    assert json.loads((tmp_path / "mixed_precision.json").read_text())["reached"] is True
    assert "probes:" in (tmp_path / "mixed_precision.txt").read_text()
    assert (tmp_path / "mixed_precision.png").read_bytes()[:4] == b"\x89PNG"


def test_scales_come_from_kept_statistics_without_recalibration() -> None:
    model, _, _, _ = _setup()
    node = model.big.output_quant
    int8_scale = node.scale.clone()
    with node_dtypes({node: ql.qint16}):
        assert node.dtype == ql.qint16
        assert float(node.scale) == pytest.approx(float(node.observer.compute_scale(ql.qint16)))
        assert float(node.scale) < float(int8_scale) / 200
    assert torch.equal(node.scale, int8_scale) and node.dtype == ql.qint8


def test_learned_scales_are_restored_exactly_after_the_search(tmp_path) -> None:
    """A dtype change rewrites a learned (LSQ) scale's parameter too; the probes must put it back."""
    model, x, eval_fn, _ = _setup()
    ql.set_qat_scales(model, "learned")
    learned = [n for _, n in ql.iter_fake_quantize(model) if n.scale_mode == "learned"]
    with torch.no_grad():
        for i, node in enumerate(learned):  # trained away from the statistics' scale
            node.scale_param.mul_(0.5 + 0.1 * i)
    ql.set_fake_quantize(model, "validation")
    with torch.no_grad():
        ref = model(x)
    params = [n.scale_param.detach().clone() for n in learned]
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    search_mixed_precision(model, table, eval_fn, 0.999, method="exact")
    assert learned and all(torch.equal(n.scale_param, p) for n, p in zip(learned, params, strict=True))
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_target_not_reachable_reports_best_and_keeps_files(tmp_path) -> None:
    model, x, eval_fn, _ = _setup()
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    before = _snapshot(model)
    reporter = SearchReporter(tmp_path)
    plan = reporter.write(search_mixed_precision(model, table, eval_fn, target=1.5, on_probe=reporter.probe))
    assert not plan.reached and [p.stage for p in plan.probes] == ["baseline", "all_high"]
    assert plan.metric == max(p.metric for p in plan.probes) and plan.ratio == 1.0
    assert any("not reached" in n for n in plan.notes)
    assert _same(before, _snapshot(model))
    assert (tmp_path / "mixed_precision_probes.json").exists() and (tmp_path / "mixed_precision.txt").exists()
    assert (tmp_path / "sensitivity_0.txt").exists()  # nothing written before is removed


def test_already_good_enough_needs_no_high_precision() -> None:
    model, _, eval_fn, _ = _setup()
    table = SensitivityTable(tuple(), "L1")
    plan = search_mixed_precision(model, table, eval_fn, target=-1.0)
    assert plan.reached and plan.raised == () and len(plan.probes) == 1


def test_multiple_tables_per_table_reduction_and_cost_aware(tmp_path) -> None:
    model, x, eval_fn, _ = _setup("multi")
    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    assert len(tables) == 3
    good = eval_fn(model)
    plan = search_mixed_precision(model, tables, eval_fn, target=0.99, chip="j6m")
    assert plan.reached and plan.metric >= 0.99 and good < 0.99
    assert ("big", "activation") in plan.raised
    assert any(p.stage == "per_table" for p in plan.probes)
    cheap = search_mixed_precision(model, tables, eval_fn, target=0.99, chip="j6m", cost_aware=True)
    assert cheap.reached and cheap.cost <= plan.cost


def test_chip_without_double_int16_keeps_the_weight_low() -> None:
    model = calibrated()
    ops = collect_ops(model)
    rows = [("fc2", "activation"), ("fc2", "weight")]
    dtypes, notes = raise_assignment(rows, ops, ql.qint16, chip=ql_chip("j6m"))
    assert dtypes[model.fc2.output_quant] == ql.qint16 and model.fc2.weight_quant not in dtypes
    assert any("double int16" in n for n in notes)
    dtypes, notes = raise_assignment(rows, ops, ql.qint16, chip=ql_chip("j6p"))
    assert dtypes[model.fc2.weight_quant] == ql.qint16 and not notes


def ql_chip(name: str):
    from qat_lightning.chips import get_chip

    return get_chip(name)


def test_fp16_topk_step(tmp_path) -> None:
    model, x, eval_fn, _ = _setup()
    for _, node in ql.iter_fake_quantize(model):
        if node.dtype == ql.qint8 and node.ch_axis is None:
            node.dtype = ql.qint16  # the all-int16 model
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    top = [r.op_name for r in table.rows if r.sensitive_type == "activation"][:2]
    two = {model.get_submodule(name).output_quant: ql.float16 for name in top}
    apply_chip_rules(collect_ops(model), two, "j6m")  # as plan.setter builds it: no float16 gemm input
    with node_dtypes(two):
        with_two = eval_fn(model)
    all_int16 = eval_fn(model)
    assert with_two > all_int16
    reporter = SearchReporter(tmp_path, "fp16_topk")
    plan = search_fp16_topk(
        model, table, eval_fn, target=with_two - 1e-9, chip="j6m", on_probe=reporter.probe
    )
    reporter.write(plan)
    assert plan.reached and plan.raised == tuple((n, "activation") for n in top) and plan.high == "float16"
    assert [p.stage for p in plan.probes] == ["baseline", "fp16", "fp16"]
    assert (
        plan.setter.assign([op.op_info for _, op in ql.iter_quant_ops(model)]).qconfigs[top[1]].output_dtype
        == ql.float16
    )
    assert (tmp_path / "fp16_topk.txt").exists()
    with pytest.raises(ValueError, match="max_k"):
        search_fp16_topk(model, table, eval_fn, 0.5, max_k=0)


def test_fp16_topk_keeps_no_op_that_does_not_beat_all_int16(tmp_path) -> None:
    model, x, eval_fn, _ = _setup()
    for _, node in ql.iter_fake_quantize(model):
        if node.dtype == ql.qint8 and node.ch_axis is None:
            node.dtype = ql.qint16
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    all_int16 = eval_fn(model)
    # the top op in fp16 feeds a gemm, which the chip reads in int16: it scores exactly like all-int16
    plan = search_fp16_topk(model, table, eval_fn, target=2.0, max_k=1, chip="j6m")
    assert [(p.stage, p.metric) for p in plan.probes] == [("baseline", all_int16), ("fp16", all_int16)]
    assert not plan.reached and plan.raised == () and plan.metric == all_int16
    # the all-int16 model already meets the target: no op is moved to fp16
    plan = search_fp16_topk(model, table, eval_fn, target=all_int16, max_k=3, chip="j6m")
    assert plan.reached and plan.raised == () and len(plan.probes) == 1


def test_j6p_path_non_gemm_fp16_gemm_searched(tmp_path) -> None:
    model, x, eval_fn, _ = _setup()
    base = j6p_base_dtypes(model)
    assert base[model.relu.output_quant] == ql.float16 and base[model.fc1.input_quant[0]] == ql.qint8
    with node_dtypes(base):
        (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    plan = search_j6p(model, table, eval_fn, target=0.0)
    assert plan.reached and plan.chip == "j6p"
    assert all(name in ("fc1", "fc2", "head", "head2") for name, _ in plan.raised)
    ops = [op.op_info for _, op in ql.iter_quant_ops(model)]
    qconfigs = plan.setter.assign(ops).qconfigs
    assert qconfigs["relu"].output_dtype == ql.float16 and qconfigs["fc1"].weight_dtype == ql.qint8


def test_bad_arguments() -> None:
    model, _, eval_fn, _ = _setup()
    table = SensitivityTable(tuple(), "L1")
    with pytest.raises(ValueError, match="higher precision"):
        search_mixed_precision(model, table, eval_fn, 0.5, low=ql.qint16, high=ql.qint8)
    with pytest.raises(ValueError, match="SensitivityTable"):
        search_mixed_precision(model, [], eval_fn, 0.5)
    with pytest.raises(ValueError, match="unknown chip"):
        search_mixed_precision(model, table, eval_fn, 0.5, chip="j7")


def _brute_targets(model, table, eval_fn) -> list[float]:
    ops = collect_ops(model)
    by_k = []
    for k in range(len(table.rows) + 1):
        rows = [(r.op_name, r.sensitive_type) for r in table.rows[:k]]
        with node_dtypes(raise_assignment(rows, ops, ql.qint16)[0]):
            by_k.append(eval_fn(model))
    return sorted({v - 1e-9 for v in by_k})


def _monotone(probes) -> bool:
    """No probe meets the target while one raising a superset of its rows misses it."""
    seen = [p for p in probes if p.stage != "cost"]
    return not any(
        p.ok and not q.ok and all(a <= b for a, b in zip(p.counts, q.counts, strict=True))
        for p in seen
        for q in seen
    )


@pytest.mark.parametrize("method", ["exact", "approximate"])
@pytest.mark.parametrize("outputs", ["single", "tuple"])
def test_fast_search_equals_exact_search(tmp_path, method: str, outputs: str) -> None:
    """Equal plans wherever the metric behaves as both searches assume (never worse with more rows raised)."""
    model, x, eval_fn, calls = _setup(outputs)
    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False, method=method)
    before = _snapshot(model)
    compared = 0
    for target in _brute_targets(model, tables[0], eval_fn):
        exact = search_mixed_precision(model, tables, eval_fn, target, method="exact", cost_aware=True)
        fast = search_mixed_precision(
            model, tables, eval_fn, target, ql.analysis.SearchConfig(cost_aware=True)
        )
        assert fast.method == "fast" and exact.method == "exact"
        if not _monotone(exact.probes + fast.probes):
            continue
        compared += 1
        assert (fast.raised, fast.ratio, fast.ratios, fast.metric, fast.reached) == (
            exact.raised,
            exact.ratio,
            exact.ratios,
            exact.metric,
            exact.reached,
        )
    assert compared >= 5  # (fewer probes needs more rows than this toy has: see test_search_probes)
    assert _same(before, _snapshot(model))


def test_search_config_is_validated_and_files_come_from_the_reporter(tmp_path) -> None:
    model, x, eval_fn, _ = _setup()
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    with pytest.raises(ValueError, match="allowed: exact, fast"):
        ql.analysis.SearchConfig(method="quick")
    with pytest.raises(ValueError, match="max_cost_probes"):
        ql.analysis.SearchConfig(max_cost_probes=-1)
    with pytest.raises(TypeError, match="SearchReporter"):
        search_mixed_precision(model, table, eval_fn, 0.5, out_dir=tmp_path)
    with pytest.raises(TypeError, match="allowed: low, high"):
        search_mixed_precision(model, table, eval_fn, 0.5, ratio=0.3)
    out = tmp_path / "search"
    plan = search_mixed_precision(model, table, eval_fn, 0.5)
    assert not out.exists()  # the search itself writes nothing
    seen = []
    reporter = SearchReporter(out)
    plan = search_mixed_precision(
        model, table, eval_fn, 0.999, on_probe=lambda p: (seen.append(p), reporter.probe(p))
    )
    assert tuple(seen) == plan.probes and json.loads((out / "mixed_precision_probes.json").read_text())
    reporter.write(plan)
    assert json.loads((out / "mixed_precision.json").read_text())["method"] == "fast"


def test_fast_search_equals_exact_search_on_the_built_in_example(tmp_path) -> None:
    from qat_lightning.example import DigitsNet, load_digits_tensors

    torch.manual_seed(0)
    images, _ = load_digits_tensors()
    net = DigitsNet().eval()
    model = ql.prepare(net, images[:32])
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        model(images[:128])
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    model.eval()
    x = images[128:384]
    with torch.no_grad():
        ref = net(x)

    def eval_fn(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(m(x), ref, dim=1).mean())

    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity("COSINE", inputs=x[:64], plot=False)
    low = search_mixed_precision(model, tables, eval_fn, 2.0, method="exact")  # all-int8 and all-int16
    base, full = low.probes[0].metric, low.probes[1].metric
    compared = 0
    for share in (0.2, 0.5, 0.8, 0.95, 0.99):
        target = base + share * (full - base)
        exact = search_mixed_precision(model, tables, eval_fn, target, method="exact")
        fast = search_mixed_precision(model, tables, eval_fn, target, method="fast")
        if _monotone(exact.probes + fast.probes):
            compared += 1
            assert (fast.raised, fast.metric, fast.ratios) == (exact.raised, exact.metric, exact.ratios)
    assert compared >= 3


class _Chain(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.q = QInput("q")
        self.fcs = torch.nn.ModuleList([QLinear(f"fc{i}", 4, 4) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q(x)
        for fc in self.fcs:
            x = fc(x)
        return x


def _chain_and_table(n: int = 24) -> tuple[_Chain, SensitivityTable]:
    """A calibrated chain of ``n`` linears and a table whose error energy sits mostly in its top rows."""
    torch.manual_seed(0)
    model = _Chain(n)
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        model(torch.randn(8, 4))
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    rows = [
        SensitivityRow(f"fc{i}", "activation", "Linear", 1 / (i + 1) ** 2, "qint8", 1, 0.1) for i in range(n)
    ]
    return model, SensitivityTable(tuple(rows), "MSE")


def _raised(m: torch.nn.Module) -> int:
    return sum(fc.output_quant.dtype == ql.qint16 for fc in m.fcs)


def test_fast_search_checks_below_and_notes_a_non_monotone_metric() -> None:
    model, table = _chain_and_table()
    fails = {0, 1, 3, 7, 11}  # rows raised (top rows first) whose metric misses the target: not monotone

    def eval_fn(m: torch.nn.Module) -> float:
        return float(sum(fc.output_quant.dtype == ql.qint16 for fc in m.fcs) not in fails)

    exact = search_mixed_precision(model, table, eval_fn, 0.5, method="exact")
    assert [p.raised for p in exact.probes] == [0, 24, 12, 6, 3, 4] and len(exact.raised) == 4
    assert not any("monotone" in n for n in exact.notes)
    fast = search_mixed_precision(model, table, eval_fn, 0.5, method="fast")
    # the guessed search alone: 1 12 3 7 9 8 -> 8 (it trusted the failing 7); the check below: 4 passes,
    # (3, 4] -> 4; 2 passes, (1, 2] -> 2; 1 was probed and fails: stop at 2 (which meets the target);
    # 2 passes below the failing 7, so bisection's path: 12 (known) 6 (new) 3 (known): it could only end
    # above 3, so 2 stands
    assert [p.raised for p in fast.probes] == [0, 24, 1, 12, 3, 7, 9, 8, 4, 2, 6]
    assert len(fast.raised) == 2 and fast.reached
    assert any("not monotone" in n and "2 rows pass" in n and "7 fail" in n for n in fast.notes)
    assert any("followed bisection's path" in n and "2 rows raised -> 2" in n for n in fast.notes)


def test_fast_search_is_not_above_exact_on_a_noisy_plateau() -> None:
    """Accuracy-like metric: a quick rise, then a plateau one sample either side of the target."""
    model, table = _chain_and_table()
    fails = {5, 7, 10, 11, 13, 14, 15, 16, 19, 20, 23}

    def eval_fn(m: torch.nn.Module) -> float:
        k = _raised(m)
        return {0: 0.0, 1: 0.18, 2: 0.34, 24: 1.0}.get(k, 0.49 if k in fails else 0.51)

    exact = search_mixed_precision(model, table, eval_fn, 0.5, method="exact")
    assert [p.raised for p in exact.probes] == [0, 24, 12, 6, 3, 1, 2] and len(exact.raised) == 3
    fast = search_mixed_precision(model, table, eval_fn, 0.5)
    # the guessed search and its check (the fast search before): 1 2 13 14 15 19 20 21, check 10 fails:
    # 21 rows. The first guess (1) is off by more than x2: bisection's path 12 6 3 (1 2 known) -> 3
    probes = [p.raised for p in fast.probes]
    assert probes == [0, 24, 1, 2, 13, 14, 15, 19, 20, 21, 10, 12, 6, 3]
    assert len(fast.raised) <= len(exact.raised) and fast.reached
    assert len(probes) <= 11 + len(exact.probes) - 2  # the old fast search's probes plus bisection's
    assert any("first guess 1 off by more than x2" in n and "21 rows raised -> 3" in n for n in fast.notes)


@pytest.mark.parametrize("boundary", [3, 9, 17])
def test_fast_search_on_a_monotone_chain_uses_fewer_probes(boundary: int) -> None:
    """A metric following the table's energy: fast = exact in fewer probes, and nothing is followed."""
    model, table = _chain_and_table()
    energy = [1 / (i + 1) ** 2 for i in range(24)]

    def eval_fn(m: torch.nn.Module) -> float:
        return 1.0 - sum(energy[_raised(m) :]) / sum(energy)

    target = 1.0 - sum(energy[boundary:]) / sum(energy) - 1e-12
    exact = search_mixed_precision(model, table, eval_fn, target, method="exact")
    fast = search_mixed_precision(model, table, eval_fn, target)
    assert len(exact.raised) == len(fast.raised) == boundary
    assert len(fast.probes) < len(exact.probes)
    assert not any("followed" in n or "monotone" in n for n in fast.notes)
