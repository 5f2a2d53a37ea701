"""search_mixed_precision: target at the minimal ratio, model restored, chip rules, fp16/J6P helpers."""

from __future__ import annotations

import json

import pytest
import torch
from analysis_toys import calibrated, data
from qat_lightning.analysis.search.precision_nodes import collect_ops, raise_assignment
from qat_lightning.analysis.search.precision_paths import j6p_base_dtypes
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis, search_fp16_topk, search_j6p, search_mixed_precision
from qat_lightning.analysis.state import node_dtypes


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
    plan = search_mixed_precision(model, table, eval_fn, target, out_dir=tmp_path)
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


def test_target_not_reachable_reports_best_and_keeps_files(tmp_path) -> None:
    model, x, eval_fn, _ = _setup()
    (table,) = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=x, plot=False)
    before = _snapshot(model)
    plan = search_mixed_precision(model, table, eval_fn, target=1.5, out_dir=tmp_path)
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
    top = next(r.op_name for r in table.rows if r.sensitive_type == "activation")
    with node_dtypes({model.get_submodule(top).output_quant: ql.float16}):
        with_one = eval_fn(model)
    plan = search_fp16_topk(model, table, eval_fn, target=with_one - 1e-9, chip="j6m", out_dir=tmp_path)
    assert plan.reached and plan.raised == ((top, "activation"),) and plan.high == "float16"
    assert (
        plan.setter.assign([op.op_info for _, op in ql.iter_quant_ops(model)]).qconfigs[top].output_dtype
        == ql.float16
    )
    assert (tmp_path / "fp16_topk.txt").exists()
    with pytest.raises(ValueError, match="max_k"):
        search_fp16_topk(model, table, eval_fn, 0.5, max_k=0)


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
