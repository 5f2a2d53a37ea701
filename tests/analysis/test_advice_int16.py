"""Dual-int16 diagnosis: a gemm with wide weights AND wide inputs is "dual"; a healthy model is clean."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from analysis_toys import QInput, QLinear
from encoder_toy import calibrated_encoder
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.advice.int16 import diagnose_dual_int16, render_dual_int16
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable


class Gemm(nn.Module):
    def __init__(self, wide_weight: bool, wide_input: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide_input = wide_input
        self.quant = QInput("quant", ql.qint16)
        self.fc = QLinear("fc", 16, 8, in_dtype=ql.qint8, w_dtype=ql.qint8, out_dtype=ql.qint16)
        with torch.no_grad():
            self.fc.weight[:, 1] = 0.0  # the wide input feature carries no signal, it only sets the scale
            if wide_weight:  # one huge weight per row (on a tiny input): int8 per-channel step too coarse
                self.fc.weight[:, 0] = 300.0

    def forward(self, x):
        return self.fc(self.quant(x))


def _data(wide_input: bool) -> torch.Tensor:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    if wide_input:
        x[:, 1] = x[:, 1] * 2000.0  # one huge feature: int8 input scale too coarse for the others
    x[:, 0] = x[:, 0] * 1e-3
    return x


def _tables(model: nn.Module, x: torch.Tensor, tmp_path):
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    model(x)
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    qa = QuantAnalysis(model, out_dir=tmp_path)
    return qa.sensitivity(metric="COSINE", inputs=x, plot=False)


def test_wide_weights_and_inputs_need_dual_int16(tmp_path):
    model = Gemm(wide_weight=True, wide_input=True)
    tables = _tables(model, _data(True), tmp_path)
    diag = diagnose_dual_int16(tables, model, chip="j6m")
    (dual,) = diag.dual
    assert dual.op_name == "fc" and dual.activation_metric > 1e-3 and dual.weight_metric > 1e-3
    assert "lacks" in dual.advice and "weight decay" in dual.advice and "normalization" in dual.advice
    assert {r.node for r in dual.ranges} == {"input.0", "weight", "output"}
    text = render_dual_int16(diag)
    assert "fc (Linear) [dual]" in text and "weight qint8: observed [" in text and "scale*qmax" in text
    j6p = diagnose_dual_int16(tables, model, chip="j6p")
    assert "'weight_dtype': ql.qint16" in j6p.dual[0].advice


def test_only_wide_inputs_is_a_single_type_finding(tmp_path):
    model = Gemm(wide_weight=False, wide_input=True)
    diag = diagnose_dual_int16(_tables(model, _data(True), tmp_path), model, chip="j6m")
    assert not diag.dual
    kinds = {f.op_name: f.kind for f in diag.findings}
    assert kinds.get("fc") == "activation_only"
    assert "fixed scale" in next(f for f in diag.findings if f.op_name == "fc").advice


def test_healthy_model_is_not_flagged(tmp_path):
    model = Gemm(wide_weight=False, wide_input=False)
    diag = diagnose_dual_int16(_tables(model, _data(False), tmp_path), model, chip="j6m")
    assert diag.findings == ()
    assert "nothing to report" in render_dual_int16(diag)


def test_l1_tables_alone_use_relative_rule():
    rows = (
        SensitivityRow("a", "activation", "Linear", 1.0, "qint8"),
        SensitivityRow("a", "weight", "Linear", 0.9, "qint8"),
        SensitivityRow("b", "activation", "Linear", 0.01, "qint8"),
    )
    diag = diagnose_dual_int16([SensitivityTable(rows, "L1")], chip=None)
    assert [f.op_name for f in diag.dual] == ["a"] and not diag.single
    assert not diagnose_dual_int16([SensitivityTable(rows, "L1")], chip=None, min_metric=2.0).findings


def test_sqnr_tables_use_the_relative_rule_in_noise_power():
    rows = (  # -SQNR rows (dB): larger = worse, all negative
        SensitivityRow("a", "activation", "Linear", -10.0, "qint8"),
        SensitivityRow("a", "weight", "Linear", -12.0, "qint8"),  # 63% of a's noise power
        SensitivityRow("b", "activation", "Linear", -30.0, "qint8"),  # 1%: below rel_threshold
    )
    table = SensitivityTable(rows, "-SQNR")
    diag = diagnose_dual_int16([table], chip=None)
    assert [f.op_name for f in diag.dual] == ["a"] and not diag.single
    assert diag.dual[0].table_max == -10.0
    only = diagnose_dual_int16([table], chip=None, min_metric=-11.0)  # SQNR <= 11 dB
    assert [(f.op_name, f.kind) for f in only.findings] == [("a", "activation_only")]
    everything = diagnose_dual_int16([table], chip=None, min_metric=-1000.0, rel_threshold=0.0)
    assert [(f.op_name, f.kind) for f in everything.findings] == [("a", "dual"), ("b", "activation_only")]
    assert not diagnose_dual_int16([table], chip=None, min_metric=-9.0).findings  # no row at SQNR <= 9 dB
    healthy = SensitivityTable(tuple(replace(r, metric=r.metric - 30.0) for r in rows), "-SQNR")
    assert not diagnose_dual_int16([healthy], chip=None).findings  # default floor: SQNR < 27 dB


def test_negated_custom_metric_is_relative_to_the_least_sensitive_row():
    rows = (  # "-PSNR": a higher-is-better custom metric, stored negated
        SensitivityRow("a", "activation", "Linear", -20.0, "qint8"),
        SensitivityRow("b", "activation", "Linear", -29.0, "qint8"),
        SensitivityRow("c", "activation", "Linear", -50.0, "qint8"),
    )
    diag = diagnose_dual_int16([SensitivityTable(rows, "-PSNR")], chip=None, rel_threshold=0.5)
    assert [f.op_name for f in diag.findings] == ["a", "b"]  # 30 and 21 above c; c itself is the reference


def test_sqnr_cosine_and_l1_tables_of_one_model_agree(tmp_path):
    qm, x = calibrated_encoder(tmp_path / "check")
    qa = QuantAnalysis(qm, out_dir=tmp_path)
    (cos,) = qa.sensitivity(metric="COSINE", inputs=x[:8], plot=False)
    (sq,) = qa.sensitivity(metric="SQNR", inputs=x[:8], plot=False)
    (l1,) = qa.sensitivity(metric="L1", inputs=x[:8], plot=False)
    assert sq.metric_name == "-SQNR" and all(r.metric < 0 for r in sq.rows)

    def found(table, floor, rel=0.3):
        diag = diagnose_dual_int16([table], qm, min_metric=floor, rel_threshold=rel)
        return {(f.op_name, f.kind) for f in diag.findings}

    got = found(sq, -math.inf)
    assert len(got) == 6 and got == found(cos, 0.0)  # 1 - cos is proportional to the noise power
    assert len(got & found(l1, 0.0)) >= 5  # L1 ranks a little differently
    assert found(sq, -math.inf, rel=1.0) == {(sq.rows[0].op_name, "activation_only")}  # the top row only
    tops = {
        r.op_name
        for t in ("activation", "weight")
        for r in [r for r in sq.rows if r.sensitive_type == t][:10]
    }
    assert {op for op, _ in found(sq, -1000.0, rel=0.0)} == tops  # the repro's "ask for everything"
    assert not found(sq, max(r.metric for r in sq.rows) + 1.0)  # a floor above every row
    assert not found(sq, None) and not found(cos, None)  # healthy: both default floors agree
