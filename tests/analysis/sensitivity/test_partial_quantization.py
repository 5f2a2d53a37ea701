"""Partial quantization: nodes the user left in FLOAT are not sensitivity rows and are never raised.

The audit's set-up: a calibrated TinyEncoder with every quant node of ``layers.1`` put in FLOAT by the user
(the seed's partial quantization). Those ops quantize nothing in the model under analysis, so the sweep
(exact and approximate) lists no row for them, the other rows keep their values, and the search neither
counts nor raises them: its plan is the smallest prefix of the remaining rows that meets the target.
"""

from __future__ import annotations

import pytest
from encoder_toy import calibrated_encoder, cosine_eval
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.search.precision_nodes import assignment_cost, collect_ops, raise_assignment
from qat_lightning.analysis.search.precision_paths import search_fp16_topk
from qat_lightning.analysis.sensitivity import sensitivity_targets
from qat_lightning.analysis.state import node_dtypes
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

pytestmark = pytest.mark.usefixtures("one_thread")

OFF = "layers.1."


def _leave_float(model: nn.Module) -> list[ql.FakeQuantize]:
    nodes = [fq for name, fq in ql.iter_fake_quantize(model) if name.startswith(OFF)]
    for fq in nodes:
        fq.state = ql.FakeQuantState.FLOAT
    return nodes


def _values(table: SensitivityTable) -> dict[tuple[str, str], float]:
    return {(r.op_name, r.sensitive_type): r.metric for r in table.rows}


@pytest.mark.parametrize("method", ["exact", "approximate"])
def test_sweep_has_no_row_of_a_user_float_op(tmp_path, method: str) -> None:
    qm, x = calibrated_encoder(tmp_path / "check")

    def sweep(out: str) -> SensitivityTable:
        (table,) = QuantAnalysis(qm, out_dir=tmp_path / out).sensitivity(
            inputs=x[:8], method=method, plot=False
        )
        return table

    full = sweep("all")
    assert any(op.startswith(OFF) for op, _ in _values(full))
    off = _leave_float(qm)
    part = sweep("part")
    got = _values(part)
    assert got and not any(op.startswith(OFF) for op, _ in got)
    assert got.keys() == {k for k in _values(full) if not k[0].startswith(OFF)}
    for key, value in got.items():  # the other ops' numbers do not change
        assert value == pytest.approx(_values(full)[key], rel=1e-9, abs=0), key
    assert all(fq.state is ql.FakeQuantState.FLOAT for fq in off)  # left as the user set them


def _smallest_prefix(model: nn.Module, rows: list[tuple[str, str]], eval_fn, target: float) -> int:
    """Brute force: the fewest top rows (table order) whose raise to qint16 meets the target."""
    ops = collect_ops(model)
    for k in range(len(rows) + 1):
        with node_dtypes(raise_assignment(rows[:k], ops, ql.qint16)[0]):
            if eval_fn(model) >= target:
                return k
    raise AssertionError("target unreachable")


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_search_never_counts_or_raises_a_user_float_op(tmp_path, method: str) -> None:
    qm, x = calibrated_encoder(tmp_path / "check")
    (measured_before,) = QuantAnalysis(qm, out_dir=tmp_path / "all").sensitivity(inputs=x[:8], plot=False)
    _leave_float(qm)
    (part,) = QuantAnalysis(qm, out_dir=tmp_path / "part").sensitivity(inputs=x[:8], plot=False)
    eval_fn = cosine_eval(qm, x[8:24])
    low = eval_fn(qm)
    target = low + 0.6 * (1.0 - low)
    rows = [(r.op_name, r.sensitive_type) for r in part.rows]
    fewest = _smallest_prefix(qm, rows, eval_fn, target)
    assert fewest == 3
    for table in (part, measured_before):  # a table measured before the user's FLOAT: same plan
        plan = ql.search_mixed_precision(qm, table, eval_fn, target=target, method=method)
        assert plan.reached and not any(op.startswith(OFF) for op, _ in plan.raised)
        assert list(plan.raised) == rows[:fewest]
        assert plan.ratios == (fewest / len(rows),)
        ops = collect_ops(qm)
        assert plan.cost == assignment_cost(ops, raise_assignment(rows[:fewest], ops, ql.qint16)[0], None)


def test_raise_assignment_leaves_user_float_nodes_alone(tmp_path) -> None:
    qm, _ = calibrated_encoder(tmp_path / "check")
    off = set(_leave_float(qm))
    ops = collect_ops(qm)
    every = [(name, kind) for name in ops for kind in ("activation", "weight")]
    dtypes, _ = raise_assignment(every, ops, ql.qint16)
    assert dtypes and not off & set(dtypes)
    assert all(op.is_float_row("activation") for name, op in ops.items() if name.startswith(OFF))


def test_fp16_topk_skips_a_user_float_output(tmp_path) -> None:
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(weight_dtype=ql.qint8, out_dtype=ql.qint16))
    qm, x = calibrated_encoder(tmp_path / "check", setter)
    (table,) = QuantAnalysis(qm, out_dir=tmp_path / "all").sensitivity(inputs=x[:8], plot=False)
    ranked = sorted(table.rows, key=lambda r: not r.op_name.startswith(OFF))  # FLOAT ops' rows first
    table = SensitivityTable(tuple(ranked), table.metric_name, table.output_name, table.method)
    _leave_float(qm)
    eval_fn = cosine_eval(qm, x[8:24])
    plan = search_fp16_topk(qm, table, eval_fn, target=2.0, max_k=2)  # unreachable: k = 1, 2 probed
    baseline, *fp16 = plan.probes
    assert [p.stage for p in fp16] == ["fp16", "fp16"]
    assert all(p.metric != baseline.metric for p in fp16)  # each probe moved an op the model quantizes
    assert not any(op.startswith(OFF) for op, _ in plan.raised)


def test_a_model_left_all_float_has_no_row_and_says_so(tmp_path) -> None:
    qm, x = calibrated_encoder(tmp_path / "check")
    with (
        ql.fake_quant_disabled(qm),
        pytest.warns(UserWarning, match="every quant node of the model is in FLOAT"),
    ):
        assert sensitivity_targets(qm) == []
    assert sensitivity_targets(qm)  # in VALIDATION again: every op has its rows
