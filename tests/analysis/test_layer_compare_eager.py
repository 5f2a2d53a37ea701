"""Single-model per-layer table on real prepare() output: shared modules (eager call sites), int8-input ops.

Every number is checked against a hand re-computation: the prepared model is run in FLOAT and in
VALIDATION with forward hooks, and the metric is computed per call site from the captured tensors.
"""

from __future__ import annotations

import math
import pathlib
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
models = pytest.importorskip("models")


class SharedFc(nn.Module):
    """``fc`` called twice on inputs of different ranges (``fc`` and ``fc#1``), then ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y = self.fc(torch.relu(y) * 4.0)
        return self.out(y)

    @staticmethod
    def example_inputs(batch: int = 8) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 8) * 3,)


def _prepared(model: nn.Module, batches: list[tuple], method: str, setter=None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = ql.prepare(model.eval(), example_inputs=batches[0], qconfig_setter=setter, method=method)
    prepared.eval()
    ql.set_fake_quantize(prepared, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            prepared(*b)
    ql.set_fake_quantize(prepared, ql.FakeQuantState.VALIDATION)
    return prepared


def _capture(model: nn.Module, batches: list[tuple], state: ql.FakeQuantState) -> dict[str, np.ndarray]:
    """Each op's output per call site, over all batches (flattened, float64)."""
    outs: dict[str, list[np.ndarray]] = {}
    calls: dict[str, int] = {}

    def hook(name: str, out: torch.Tensor) -> None:
        # an eager dispatcher (``fc``) also sees the calls it forwards to ``fc#k``: keep the first call of
        # each op per forward only
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == 1:
            outs.setdefault(name, []).append(out.detach().double().reshape(-1).numpy())

    handles = [model.register_forward_pre_hook(lambda mod, args: calls.clear())]
    for name, op in ql.iter_quant_ops(model):
        handles.append(op.register_forward_hook(lambda mod, args, out, name=name: hook(name, out)))
    with torch.no_grad(), ql.fake_quant_state(model, state):
        for b in batches:
            model(*b)
    for h in handles:
        h.remove()
    return {name: np.concatenate(parts) for name, parts in outs.items()}


@pytest.mark.parametrize("method", ["eager", "fx"])
@pytest.mark.parametrize("cls", [models.CheckModel, SharedFc])
def test_shared_module_call_sites_match_a_hand_computation(tmp_path, cls, method: str) -> None:
    torch.manual_seed(0)
    batches = [cls.example_inputs(4) for _ in range(3)]
    model = _prepared(cls(), batches, method)
    assert {"conv", "conv#1"} <= {n for n, _ in ql.iter_quant_ops(model)} or cls is SharedFc
    data = batches[1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qa = QuantAnalysis(model, out_dir=tmp_path)
        qa.run(data)
    assert not [w for w in caught if "call site" in str(w.message)]
    comparison = qa.compare_per_layer(plot=False)
    base = _capture(model, data, ql.FakeQuantState.FLOAT)
    quant = _capture(model, data, ql.FakeQuantState.VALIDATION)
    shared = [r.mod_name for r in comparison.rows if "#" in r.mod_name]
    assert shared  # the shared module's second call site is a row of its own
    for row in comparison.rows:
        a, b = base[row.mod_name], quant[row.mod_name]
        cosine = a @ b / np.sqrt((a @ a) * (b @ b))
        assert row.cosine == pytest.approx(cosine, rel=1e-9), row.mod_name
        assert row.atol == pytest.approx(np.abs(a - b).max(), rel=1e-9, abs=1e-12), row.mod_name
        assert row.base_model_max == pytest.approx(a.max(), rel=1e-12), row.mod_name
        assert row.analy_model_max == pytest.approx(b.max(), rel=1e-12), row.mod_name
        assert row.cosine > 0.999, row.mod_name
    # the eager dispatch state is the model's own again: a plain forward runs every call site in turn
    again = _capture(model, data, ql.FakeQuantState.VALIDATION)
    for name, value in quant.items():
        np.testing.assert_array_equal(again[name], value)


class _J6pNet(nn.Module):
    """``a``: a Linear with large weights (fp16 output |max| ~200) on a small int8 input."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gain = gain
        self.a = nn.Linear(16, 16)
        self.act = nn.GELU()
        self.b = nn.Linear(16, 4)
        with torch.no_grad():
            self.a.weight.mul_(100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x * self.gain)))


def _node_input_absmax(model: nn.Module, node: nn.Module, batches: list[tuple]) -> float:
    seen: list[float] = []
    handle = node.register_forward_hook(lambda m, args, out: seen.append(float(args[0].abs().max())))
    with torch.no_grad(), ql.fake_quant_state(model, ql.FakeQuantState.VALIDATION):
        for b in batches:
            model(*b)
    handle.remove()
    return max(seen)


@pytest.mark.parametrize("gain", [1.0, 10.0])
def test_int8_input_op_advice_and_steps_measure_the_input_node(tmp_path, gain: float) -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(64, 16, generator=gen),) for _ in range(3)]
    model = _prepared(_J6pNet(gain), batches, "fx", models.j6p_gemm_int8_setter())
    op = model.get_submodule("a")
    node = op.input_quant[0]
    assert node.dtype == ql.qint8 and op.output_quant.dtype == ql.float16
    qa = QuantAnalysis(model, out_dir=tmp_path)
    qa.run(batches[:1])
    comparison = qa.compare_per_layer(plot=False)
    row = comparison.row("a")
    # the row's dtype/scale are the int8 INPUT node's ...
    assert row.quant_dtype == "qint8" and row.qscale == pytest.approx(float(node.scale), rel=1e-7)
    a = _capture(model, batches[:1], ql.FakeQuantState.FLOAT)["a"]
    b = _capture(model, batches[:1], ql.FakeQuantState.VALIDATION)["a"]
    out_max = np.abs(a).max()
    assert out_max > 100 and row.max_atol_diff == pytest.approx(np.abs(a - b).max(), rel=1e-9)
    # ... so the fp16 output's error is not a number of that node's steps
    assert math.isnan(row.max_qscale_diff)
    # and the int16 advice measures the tensor the int8 node quantizes, not the fp16 output (|max| ~200)
    in_max = _node_input_absmax(model, node, batches[:1])
    advice = [adv for adv in comparison.advice_for("a") if adv.kind == "int16"]
    if in_max <= 10:
        assert gain == 1.0 and advice == []
    else:
        assert gain == 10.0 and len(advice) == 1
        assert advice[0].value == pytest.approx(in_max, rel=1e-9)
        assert node.name in advice[0].message and f"{out_max:.6g}" not in advice[0].message
