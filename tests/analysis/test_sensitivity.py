"""sensitivity(): ranking, downstream slice == naive full forward, approximate method, table plumbing."""

from __future__ import annotations

import warnings

import pytest
import torch
from analysis_toys import IndexNet, InplaceNet, bad_batch, calibrate, calibrated, data, trace
from qat_lightning.analysis.compare.metrics import resolve_metric
from qat_lightning.analysis.sensitivity.downstream import GraphSlicer
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable
from qat_lightning.quant.qconfig.setter import QconfigSetter
from qat_lightning.quant.qconfig.templates import SensitivityTemplate

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.sensitivity import build_tables, exact_sensitivity, sensitivity_targets


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_broken_layers_rank_first_and_last_ops_near_zero(tmp_path) -> None:
    model = calibrated()
    states = [n.state for _, n in ql.iter_fake_quantize(model)]
    qa = QuantAnalysis(model, out_dir=tmp_path)
    qa.auto_find_bad_case([bad_batch(), data(8, 2)])
    (table,) = qa.sensitivity()
    assert table.metric_name == "L1" and table.method == "exact" and table.output_name == "0"
    assert {table.rows[0].op_name, table.rows[1].op_name} == {"big", "quant"}
    assert table.rows[0].sensitive_type == "activation"
    assert table.rows[-1].metric < 0.01 * table.rows[0].metric
    assert [n.state for _, n in ql.iter_fake_quantize(model)] == states
    # on normal data the int16-needing op dominates alone
    (normal,) = qa.sensitivity(inputs=data(16, 4), plot=False)
    assert normal.rows[0].op_name == "big" and normal.rows[0].metric > 5 * normal.rows[1].metric
    text = (tmp_path / "sensitivity_0.txt").read_text()
    assert "op_name" in text and "sensitive_type" in text and "flops" in text and "(47.06%)" in text
    assert (tmp_path / "sensitivity_0.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sensitivity_0.csv").read_text().startswith("op_name,sensitive_type,op_type,L1")


def test_rows_columns_and_flops_share() -> None:
    model = calibrated()
    targets = sensitivity_targets(model)
    assert [(t.op_name, t.sensitive_type) for t in targets] == [
        ("quant", "activation"),
        ("fc1", "activation"),
        ("fc1", "weight"),
        ("relu", "activation"),
        ("fc2", "activation"),
        ("fc2", "weight"),
        ("add", "activation"),
        ("big", "activation"),
        ("head", "activation"),
        ("head", "weight"),
        ("head2", "activation"),
        ("head2", "weight"),
    ]
    fc1 = next(t for t in targets if t.op_name == "fc1" and t.sensitive_type == "activation")
    assert fc1.nodes == (model.fc1.output_quant,)  # the float32 input node quantizes nothing
    metric = resolve_metric("L1")
    results = exact_sensitivity(model, (data(8, 1),), metric, targets)
    (table,) = build_tables(results, metric, "exact", all_flops=1000)
    row = next(r for r in table.rows if r.op_name == "fc2" and r.sensitive_type == "weight")
    assert (row.op_type, row.quant_dtype, row.flops, row.flops_share) == ("Linear", "qint8", 256, 0.256)
    # by hand: only fc2's weight node quantizes
    model.eval()
    with torch.no_grad(), ql.fake_quant_disabled(model):
        ref = model(data(8, 1))
        model.fc2.weight_quant.state = ql.FakeQuantState.VALIDATION
        out = model(data(8, 1))
    assert row.metric == pytest.approx((ref.double() - out.double()).abs().mean().item(), rel=1e-9)
    values = [r.metric for r in table.rows]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("outputs", ["single", "multi", "dict"])
def test_downstream_slice_equals_naive_full_forward(outputs: str) -> None:
    gm = calibrated(outputs=outputs, fx_traced=True)
    x = bad_batch()
    targets = sensitivity_targets(gm)
    for name in ("L1", "COSINE", "ATOL"):
        metric = resolve_metric(name)
        sliced = exact_sensitivity(gm, (x,), metric, targets, use_slice=True)
        naive = exact_sensitivity(gm, (x,), metric, targets, use_slice=False)
        assert sliced == naive  # the same computation node for node: bitwise identical
    eager = calibrated(outputs=outputs)  # the same model untraced: full forwards, same numbers
    by_key = {(t.op_name, t.sensitive_type): v for t, v in sliced.items()}
    for t, values in exact_sensitivity(eager, (x,), metric, sensitivity_targets(eager)).items():
        if (t.op_name, t.sensitive_type) in by_key:
            assert values == pytest.approx(by_key[(t.op_name, t.sensitive_type)], rel=1e-6)


def test_slicer_runs_only_downstream_nodes() -> None:
    gm = calibrated(fx_traced=True)
    slicer = GraphSlicer(gm)
    down = [n.name for n in slicer.downstream(slicer.start_nodes("add"))]
    assert down == ["add", "big", "head"]
    head2 = calibrated(outputs="dict", fx_traced=True)
    slicer = GraphSlicer(head2)
    assert [n.name for n in slicer.downstream(slicer.start_nodes("head2"))] == ["head2"]


def test_index_ops_in_a_slice_are_replayed_per_node() -> None:
    gm = trace(calibrate(IndexNet(), [data(64)]))
    x = data(16, 5)
    targets = sensitivity_targets(gm)
    metric = resolve_metric("L1")
    sliced = exact_sensitivity(gm, (x,), metric, targets)
    assert sliced == exact_sensitivity(gm, (x,), metric, targets, use_slice=False)
    fc_act = next(t for t in targets if t.op_name == "fc" and t.sensitive_type == "activation")
    assert sliced[fc_act]["0-1"] == 0.0 and sliced[fc_act]["0-3"] == 0.0  # replayed indices


def test_inplace_mutation_falls_back_to_full_forwards() -> None:
    gm = trace(calibrate(InplaceNet(), [data(64)]))
    targets = sensitivity_targets(gm)
    metric = resolve_metric("L1")
    with pytest.warns(UserWarning, match="in-place"):
        sliced = exact_sensitivity(gm, (data(8, 1),), metric, targets)
    assert sliced == exact_sensitivity(gm, (data(8, 1),), metric, targets, use_slice=False)


@pytest.mark.parametrize("fx_traced", [False, True])
def test_approximate_method_ranks_like_exact(tmp_path, fx_traced: bool) -> None:
    model = calibrated(fx_traced=fx_traced)
    qa = QuantAnalysis(model, out_dir=tmp_path)
    x = data(32, 6)
    (exact,) = qa.sensitivity(inputs=x, plot=False)
    (approx,) = qa.sensitivity(inputs=x, method="approximate", num_probes=4, plot=False)
    assert approx.method == "approximate" and approx.rows[0].op_name == "big"
    key = {(r.op_name, r.sensitive_type): r.metric for r in exact.rows}
    pairs = [(key[(r.op_name, r.sensitive_type)], r.metric) for r in approx.rows]
    assert _spearman([p[0] for p in pairs], [p[1] for p in pairs]) > 0.8
    big = next(r for r in approx.rows if r.op_name == "big")
    assert big.metric == pytest.approx(exact.rows[0].metric, rel=0.5)  # same scale as the exact L1
    for method in ("exact", "approximate"):
        (cos,) = qa.sensitivity(metric="COSINE", inputs=x, method=method, plot=False)
        assert cos.metric_name == "1-COSINE" and cos.rows[0].op_name == "big"


def test_tables_feed_sensitivity_template(tmp_path) -> None:
    model = calibrated(outputs="multi")
    qa = QuantAnalysis(model, out_dir=tmp_path)
    tables = qa.sensitivity(inputs=data(8, 1), plot=False)
    assert all(isinstance(t, SensitivityTable) for t in tables)
    selected = SensitivityTemplate(tables, topk_or_ratio=1).selected()
    assert ("big", "activation") in selected
    ops = [op.op_info for _, op in ql.iter_quant_ops(model)]
    qconfigs = QconfigSetter(templates=[SensitivityTemplate(tables[0], 1)]).assign(ops).qconfigs
    assert qconfigs["big"].output_dtype == ql.qint16 and qconfigs["fc1"].output_dtype == ql.qint8


def test_bad_arguments(tmp_path) -> None:
    qa = QuantAnalysis(calibrated(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="allowed: activation, weight"):
        qa.sensitivity(types=("bias",), inputs=data(2))
    with pytest.raises(ValueError, match="allowed: exact, approximate"):
        qa.sensitivity(method="fast", inputs=data(2))
    with pytest.raises(ValueError, match="auto_find_bad_case"):
        qa.sensitivity()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (weights,) = qa.sensitivity(types="weight", inputs=data(4), plot=False)
    assert {r.sensitive_type for r in weights.rows} == {"weight"}
