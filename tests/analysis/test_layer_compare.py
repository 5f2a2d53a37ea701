"""run() + compare_per_layer(): every column against a float64 hand computation, the advisor, alignment."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from analysis_toys import BrokenNet, bad_batch, calib_data, calibrate, calibrated, data
from qat_lightning.analysis.compare.lockstep import Lockstep

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis


def _capture(model: torch.nn.Module, x: torch.Tensor, float_run: bool) -> tuple[dict, dict]:
    """Whole op outputs (and output-node inputs) of one run, the way a user would check by hand."""
    outs: dict[str, torch.Tensor] = {}
    pre: dict[str, torch.Tensor] = {}
    handles = []
    for name, op in ql.iter_quant_ops(model):
        handles.append(
            op.register_forward_hook(lambda m, a, o, n=name: outs.__setitem__(n, o.detach().clone()))
        )
        handles.append(
            op.output_quant.register_forward_hook(
                lambda m, a, o, n=name: pre.__setitem__(n, a[0].detach().clone())
            )
        )
    model.eval()
    state = ql.FakeQuantState.FLOAT if float_run else ql.FakeQuantState.VALIDATION
    with torch.no_grad(), ql.fake_quant_state(model, state):
        model(x)
    for h in handles:
        h.remove()
    return outs, pre


def _columns(a: np.ndarray, b: np.ndarray, scale: float, rows: int) -> dict[str, float]:
    a, b = a.ravel(), b.ravel()
    d = a - b
    nz = a != 0
    ar, br = a.reshape(rows, -1), b.reshape(rows, -1)
    kl = []
    for i in range(rows):
        p = np.exp(ar[i] - ar[i].max())
        p /= p.sum()
        q = np.exp(br[i] - br[i].max())
        q /= q.sum()
        kl.append((p * np.log(p / q)).sum())
    return {
        "cosine": a @ b / np.sqrt((a @ a) * (b @ b)),
        "mse": (d * d).mean(),
        "l1": np.abs(d).mean(),
        "kl": float(np.mean(kl)),
        "sqnr": 10 * np.log10((a @ a) / (d @ d)) if (d @ d) > 0 else math.inf,
        "atol": np.abs(d).max(),
        "rtol": (np.abs(d[nz]) / np.abs(a[nz])).max(),
        "base_model_min": a.min(),
        "analy_model_min": b.min(),
        "base_model_max": a.max(),
        "analy_model_max": b.max(),
        "base_model_mean": a.mean(),
        "analy_model_mean": b.mean(),
        "base_model_var": a.var(),
        "analy_model_var": b.var(),
        "max_atol_diff": np.abs(d).max(),
        "max_qscale_diff": np.abs(d).max() / scale,
    }


@pytest.mark.parametrize("fx_traced", [False, True])
def test_every_column_matches_a_hand_computation(tmp_path, fx_traced: bool) -> None:
    model = calibrated(fx_traced=fx_traced)
    x = bad_batch()
    qa = QuantAnalysis(model, out_dir=tmp_path)
    qa.run([x])
    comparison = qa.compare_per_layer()
    float_outs, _ = _capture(model, x, True)
    quant_outs, quant_pre = _capture(model, x, False)
    assert [r.mod_name for r in comparison.rows] == ["quant", "fc1", "relu", "fc2", "add", "big", "head"]
    for row in comparison.rows:
        node = model.get_submodule(row.mod_name).output_quant
        scale = float(node.scale)
        assert row.quant_dtype == "qint8" and row.qscale == pytest.approx(scale, rel=1e-7)
        assert row.shape == tuple(float_outs[row.mod_name].shape)
        want = _columns(
            float_outs[row.mod_name].double().numpy(),
            quant_outs[row.mod_name].double().numpy(),
            scale,
            x.shape[0],
        )
        for key, value in want.items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-9, abs=1e-12), (row.mod_name, key)
        # clipping vs rounding of the op's own output node (its input in the quantized run)
        xin = quant_pre[row.mod_name].double().numpy()
        err = (quant_outs[row.mod_name].double().numpy() - xin) ** 2
        clipped = (xin / scale > 127.5) | (xin / scale < -128.5)
        total = err.sum()
        if total == 0:
            assert math.isnan(row.clip_share) and math.isnan(row.round_share)
            continue
        assert row.clip_share == pytest.approx(err[clipped].sum() / total, rel=1e-9, abs=1e-12)
        assert row.round_share == pytest.approx(err[~clipped].sum() / total, rel=1e-9, abs=1e-12)
        assert row.clip_ratio == pytest.approx(clipped.mean())
    with open(tmp_path / "compare_per_layer.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["mod_name"] for r in table] == [r.mod_name for r in comparison.rows]
    assert float(table[3]["Cosine"]) == pytest.approx(comparison.rows[3].cosine, rel=1e-12)
    text = (tmp_path / "compare_per_layer.txt").read_text()
    for column in ("mod_name", "base_op_type", "analy_op_type", "qscale", "max_qscale_diff", "clip_share"):
        assert column in text
    assert (tmp_path / "compare_per_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_advisor_flags_the_right_layers(tmp_path) -> None:
    qa = QuantAnalysis(calibrated(), out_dir=tmp_path)
    qa.auto_find_bad_case([bad_batch()])
    qa.run()
    comparison = qa.compare_per_layer()
    kinds = {(a.op_name, a.kind) for a in comparison.advice}
    # quant: calibrated range (99th percentile) far too small for the bad sample -> fixed scale
    fixed = [a for a in comparison.advice if a.kind == "fixed_scale"]
    assert [a.op_name for a in fixed] == ["quant"]
    amax = max(abs(comparison.row("quant").base_model_min), abs(comparison.row("quant").base_model_max))
    assert fixed[0].value == pytest.approx(amax / 127)
    assert comparison.row("quant").clip_share > 0.99
    # big: int8 with |max| in the hundreds -> int16; almost all of its error is rounding
    assert ("big", "int16") in kinds
    assert comparison.row("big").round_share > 0.99
    assert not any(k == "nonfinite" for _, k in kinds)
    assert "Advisor:" in (tmp_path / "compare_per_layer.txt").read_text()


def test_nonfinite_is_reported(tmp_path) -> None:
    model = calibrated()
    x = data(4, 3)
    x[1, 0] = math.inf
    qa = QuantAnalysis(model, out_dir=tmp_path)
    qa.run([x])
    comparison = qa.compare_per_layer(plot=False)
    assert ("quant", "nonfinite") in {(a.op_name, a.kind) for a in comparison.advice}


class _Mul(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


def test_two_model_alignment_and_unaligned_ops(tmp_path) -> None:
    calib = calibrated()
    float_copy = copy.deepcopy(calib)
    ql.set_fake_quantize(float_copy, ql.FakeQuantState.FLOAT)
    float_copy.big = _Mul()  # same path, a plain float module of another kind: cannot be aligned
    single = QuantAnalysis(calib, out_dir=tmp_path / "one")
    single.run([data(8, 1)])
    one = single.compare_per_layer(plot=False)
    pair = QuantAnalysis(float_copy, calib, out_dir=tmp_path / "two")
    pair.run([data(8, 1)])
    two = pair.compare_per_layer(plot=False)
    assert [name for name, _ in two.unaligned] == ["big"]
    assert math.isnan(two.row("big").cosine) and not math.isnan(two.row("big").analy_model_max)
    for name in ("quant", "fc1", "relu", "fc2", "add"):  # the float copy matches op by op
        assert two.row(name).cosine == pytest.approx(one.row(name).cosine, rel=1e-9)
    assert "without a float counterpart" in (tmp_path / "two" / "compare_per_layer.txt").read_text()


def test_lockstep_holds_one_reference_activation_at_a_time() -> None:
    model = calibrate(BrokenNet(), [calib_data()])
    seen: list[int] = []
    original = Lockstep.take

    def spy(self, key):
        seen.append(sum(len(q) for q in self._pending.values()))
        return original(self, key)

    Lockstep.take = spy
    try:
        qa = QuantAnalysis(model, out_dir="unused")
        qa.run([data(8, 1)])
    finally:
        Lockstep.take = original
    assert len(seen) == 7 and max(seen) <= 1


def test_run_needs_bad_cases_or_data(tmp_path) -> None:
    qa = QuantAnalysis(calibrated(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="auto_find_bad_case"):
        qa.run()
    with pytest.raises(ValueError, match="no quantized ops"):
        QuantAnalysis(torch.nn.Linear(2, 2))
