"""A plan describes itself: ``ratios`` are the final shares, ``notes`` the plan's own chip downgrades.

* ``cost_aware=True`` (the audit's set-up: a reversed L1 table, so the cost step removes many rows):
  ``plan.ratios`` is the share of rows the plan raises, in the field, ``mixed_precision.txt`` and the
  JSON; the cost step's rows are no top-k of the table, so a ``SensitivityTemplate`` fed that ratio raises
  other rows (``plan.setter`` reproduces the plan). Without the cost step the template reproduces it.
* ``plan.notes`` lists the downgrades a fresh ``prepare`` with ``plan.setter`` logs (its changelog), not
  those of the probes on the way (the all-int16 probe on j6m downgrades every gemm weight).
"""

from __future__ import annotations

import json

import pytest
from encoder_toy import calibrated_encoder, cosine_eval

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.reports import plan_text
from qat_lightning.analysis.search import SearchReporter, search_fp16_topk
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

pytestmark = pytest.mark.usefixtures("one_thread")

DOUBLE = "no double int16 gemm: "


def _setup(tmp_path, metric: str = "L1", setter: ql.QconfigSetter | None = None):
    qm, x = calibrated_encoder(tmp_path / "check", setter)
    (table,) = QuantAnalysis(qm, out_dir=tmp_path / "qa").sensitivity(metric=metric, inputs=x[:8], plot=False)
    eval_fn = cosine_eval(qm, x[8:24])
    return qm, table, eval_fn, eval_fn(qm)


def _reversed(table: SensitivityTable) -> SensitivityTable:
    return SensitivityTable(tuple(reversed(table.rows)), table.metric_name, table.output_name, table.method)


def test_cost_aware_ratio_is_the_final_share(tmp_path) -> None:
    qm, table, eval_fn, low = _setup(tmp_path)
    table = _reversed(table)
    reporter = SearchReporter(tmp_path / "out")
    target = low + 0.5 * (1.0 - low)
    plan = ql.search_mixed_precision(
        qm, table, eval_fn, target=target, cost_aware=True, method="exact", on_probe=reporter.probe
    )
    reporter.write(plan)
    n, raised = len(table.rows), len(plan.raised)
    common = [p for p in plan.probes if p.stage == "common" and p.ok][-1]
    assert plan.reached and raised < common.raised  # the cost step removed rows
    assert plan.ratios == (raised / n,)
    assert json.loads((tmp_path / "out" / "mixed_precision.json").read_text())["ratios"] == [raised / n]
    assert f"per-table ratios {raised / n:.4g}" in (tmp_path / "out" / "mixed_precision.txt").read_text()
    kept = [p for p in plan.probes if p.stage == "cost" and p.ok]
    assert kept[-1].counts == (raised,) and kept[-1].metric == plan.metric
    top = ql.SensitivityTemplate(table, topk_or_ratio=plan.ratios[0]).selected()
    assert len(top) == raised and set(top) != set(plan.raised)  # no top-k: the template differs (doc)
    assert ql.SensitivityTemplate(table, topk_or_ratio=raised).selected() == top


def test_ratio_without_cost_step_reproduces_the_plan_with_a_template(tmp_path) -> None:
    qm, table, eval_fn, low = _setup(tmp_path)
    plan = ql.search_mixed_precision(qm, table, eval_fn, target=low + 0.5 * (1.0 - low), method="exact")
    (ratio,) = plan.ratios
    assert ratio == len(plan.raised) / len(table.rows)
    assert ql.SensitivityTemplate(table, topk_or_ratio=ratio).selected() == plan.raised


def _downgrades(notes: tuple[str, ...]) -> list[str]:
    return [n.removeprefix(DOUBLE) for n in notes if " -> " in n]


@pytest.mark.parametrize(("share", "downgrades"), [(0.7, 0), (2.0, 16)])
def test_plan_notes_are_the_downgrades_of_its_setter(tmp_path, share: float, downgrades: int) -> None:
    qm, table, eval_fn, low = _setup(tmp_path, "COSINE")
    plan = ql.search_mixed_precision(qm, table, eval_fn, target=low + share * (1.0 - low), chip="j6m")
    assert plan.reached == (share < 1.0)  # 2.0: unreachable, the plan is the all-int16 probe
    assert any(p.stage == "all_high" for p in plan.probes)  # the probe with 16 downgrades ran
    fresh, _ = calibrated_encoder(tmp_path / "fresh", plan.setter)
    assert _downgrades(plan.notes) == list(fresh.prepare_record.changelog)
    assert len(_downgrades(plan.notes)) == downgrades
    assert (DOUBLE in plan_text(plan)) == (downgrades > 0)  # mixed_precision.txt lists the same notes


def test_fp16_plan_notes_are_the_downgrades_of_its_setter(tmp_path) -> None:
    reference = ql.get_qconfig(weight_dtype=ql.qint8, out_dtype=ql.qint16)
    base = ql.QconfigSetter(reference_qconfig=reference, chip="j6m", on_violation="downgrade")
    qm, table, _, _ = _setup(tmp_path, "COSINE", base)
    first = ("layers.0.attn.matmul_1", "layers.1.attn.matmul_1")  # each float16 output feeds a gemm
    ranked = sorted(table.rows, key=lambda r: (r.sensitive_type, r.op_name not in first, r.op_name))
    table = SensitivityTable(tuple(ranked), table.metric_name, table.output_name, table.method)
    node = dict(ql.iter_quant_ops(qm))[first[0]].output_quant

    def score(_model) -> float:  # 1 once the first op's output is float16: k = 2, 3 do no better
        return float(node.dtype == ql.float16)

    plan = search_fp16_topk(qm, table, score, target=2.0, max_k=3, chip="j6m", reference_qconfig=reference)
    assert plan.raised == ((first[0], "activation"),) and len(plan.probes) == 4
    fresh, _ = calibrated_encoder(tmp_path / "fresh", plan.setter)
    own = set(qm.prepare_record.changelog)  # the model's own downgrades (matmul input.1), not the plan's
    expected = [n for n in fresh.prepare_record.changelog if n not in own]
    assert _downgrades(plan.notes) == expected
    assert len(expected) == 1 and expected[0].startswith("layers.0.attn.proj: input.0 float16")
