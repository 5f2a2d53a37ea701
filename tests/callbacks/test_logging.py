"""``dtype_ratios`` (the ``quant/ratio_<dtype>`` scalars) counts ops as ``check_model`` does.

Every gemm has a ``float32`` pass-through input node ("input left as produced": the producer's output node
quantizes it); it must not make the gemm a float32 op. An op computes in one dtype: a gemm in the widest
of its effective inputs and weight, another op in its output dtype, an op left without quant points in
float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import torch
from cb_helpers import make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import qat_lightning as ql
from qat_lightning.app.costs import quant_stats
from qat_lightning.callbacks import PrepareQuantization, QuantStatsMonitor
from qat_lightning.callbacks.logging import dtype_ratios
from qat_lightning.example.model import DigitsNet
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import iter_quant_ops
from qat_lightning.quant.preparation.model_check import check_model, dtype_op_shares
from tests.models import GeluResidual

DTYPES = ("qint8", "qint16", "float16", "float32")


def _digits(mapping: dict[str, object] | None = None) -> nn.Module:
    """DigitsNet (20 ops: convs, linears, matmuls, cat, ...) prepared with fx, ``mapping`` per op name."""
    torch.manual_seed(0)
    templates = [ql.ModuleNameTemplate(mapping)] if mapping else []
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(observer="minmax"), templates=templates)
    return ql.prepare(DigitsNet().eval(), torch.rand(2, 1, 8, 8) * 16, qconfig_setter=setter, method="fx")


def _ops(model: nn.Module) -> int:
    return len(list(iter_quant_ops(model)))


def _check_model_shares(model: nn.Module) -> dict[str, float]:
    rows = check_model(model).dtype_summary
    total = sum(r.ops for r in rows)
    return {r.dtype: r.ops / total for r in rows}


def test_all_int8_model_is_all_int8() -> None:
    model = _digits()
    gemms = [op for _, op in iter_quant_ops(model) if op.op_info.kind == "gemm"]
    assert gemms and all(op.input_quant[0].dtype == ql.float32 for op in gemms)  # the pass-through nodes
    assert dtype_ratios(model) == {"qint8": 1.0, "qint16": 0.0, "float16": 0.0, "float32": 0.0}


@pytest.mark.parametrize(
    ("op", "int16_ops"),
    [
        ("mean", ["mean"]),  # feeds a LayerNorm (computes in its own int8 output)
        ("cat", ["cat", "head"]),  # feeds the head Linear: it takes cat's int16 output as its input
    ],
)
def test_one_int16_op_counts_as_int16(op: str, int16_ops: Sequence[str]) -> None:
    model = _digits({op: ql.qint16})
    n = _ops(model)
    ratios = dtype_ratios(model)
    assert ratios["qint16"] == pytest.approx(len(int16_ops) / n)
    assert ratios["qint8"] == pytest.approx((n - len(int16_ops)) / n)
    assert ratios["float16"] == 0.0 and ratios["float32"] == 0.0


@pytest.mark.parametrize(
    ("op", "float32_ops"),
    [
        ("norm", 1),
        ("attn.q", 1),  # a gemm set to float32: its weight is float32
        ("attn.softmax", 2),  # and attn.matmul_1, which takes its float32 output
    ],
)
def test_a_float32_op_set_on_purpose_is_reported(op: str, float32_ops: int) -> None:
    model = _digits({op: ql.float32})
    n = _ops(model)
    ratios = dtype_ratios(model)
    assert ratios["float32"] == pytest.approx(float32_ops / n)
    assert ratios["qint8"] == pytest.approx((n - float32_ops) / n)


def test_ops_left_float_by_prepare_count_as_float32() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = ql.prepare(GeluResidual().eval(), torch.randn(2, 8), method="eager")
    assert eager.prepare_record.float_ops
    ratios = dtype_ratios(eager)
    assert ratios["float32"] > 0.0
    assert ratios == _check_model_shares(eager)


@pytest.mark.parametrize(
    "mapping",
    [None, {"mean": ql.qint16}, {"cat": ql.qint16}, {"attn.softmax": ql.float32}, {"attn.q": ql.float16}],
    ids=["int8", "mean-int16", "cat-int16", "softmax-float32", "q-float16"],
)
def test_ratios_equal_check_model(mapping: dict[str, object] | None) -> None:
    model = _digits(mapping)
    assert dtype_ratios(model) == _check_model_shares(model) == dtype_op_shares(model)
    assert sum(dtype_ratios(model).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("mapping", [None, {"mean": ql.qint16}], ids=["int8", "mean-int16"])
def test_ratios_equal_quant_stats(mapping: dict[str, object] | None) -> None:
    """Where the app's "int16 / fp16 anywhere" ratios coincide with the compute dtype, they agree."""
    model = _digits(mapping)
    ratios = dtype_ratios(model)
    int16, fp16, _ = quant_stats(model, "j6p")
    assert (ratios["qint16"], ratios["float16"]) == pytest.approx((int16, fp16))


def test_hand_placed_nodes_without_ops_fall_back_to_the_nodes() -> None:
    model = nn.Sequential(FakeQuantize("qint8"), nn.Linear(2, 2), FakeQuantize("qint16"))
    assert dtype_ratios(model) == {"qint8": 0.5, "qint16": 0.5, "float16": 0.0, "float32": 0.0}
    assert dtype_ratios(nn.Linear(2, 2)) == {}


def test_prepare_and_monitor_log_the_same_ratios(tmp_path, lit, data) -> None:
    """PrepareQuantization (step 0, from the check report) and QuantStatsMonitor log one value per tag."""
    trainer = make_trainer(tmp_path, [PrepareQuantization(), QuantStatsMonitor()], max_epochs=1)
    trainer.fit(lit, datamodule=data)
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    expected = _check_model_shares(lit.model)
    assert expected["qint8"] == 1.0
    for dtype in DTYPES:
        events = acc.Scalars(f"quant/ratio_{dtype}")
        assert len(events) >= 2  # prepare's and the monitor's
        assert all(e.value == pytest.approx(expected[dtype]) for e in events), (dtype, events)
