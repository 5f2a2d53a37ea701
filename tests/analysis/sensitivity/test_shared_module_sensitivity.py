"""Sensitivity of quant nodes that several calls share: the downstream slice must re-run every call.

A module called twice shares quant nodes between its calls (prepare: the weight node of ``fc`` and
``fc#1``; hand-built ops: one activation op reachable from two leaf blocks). Enabling such a node changes
every call, so the sliced run must equal one full forward, and the rows of one node carry one value.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from analysis_toys import QElementwise, QInput, QLinear, calibrate, data
from torch import fx, nn

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.compare.metrics import resolve_metric
from qat_lightning.analysis.sensitivity.approximate import approximate_sensitivity
from qat_lightning.analysis.sensitivity.downstream import GraphSlicer
from qat_lightning.analysis.sensitivity.exact import SensitivityTarget, exact_sensitivity, sensitivity_targets

torch.set_num_threads(1)


def _direct_l1(model: nn.Module, x: torch.Tensor, target: SensitivityTarget) -> float:
    """Enable only the target's nodes, run the whole model, L1 against the all-float output."""
    states = {n: n.state for _, n in ql.iter_fake_quantize(model)}
    try:
        with torch.no_grad():
            ql.set_fake_quantize(model, ql.FakeQuantState.FLOAT)
            ref = model(x)
            for node in target.nodes:
                node.state = ql.FakeQuantState.VALIDATION
            out = model(x)
    finally:
        for node, state in states.items():
            node.state = state
    return (out.double() - ref.double()).abs().mean().item()


# ---------------------------------------------------------------- prepare(): one nn.Linear and one nn.ReLU
class SharedLinearNet(nn.Module):
    """``fc`` and ``act`` are each called twice; fc's first call is upstream of its second."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x) * 2.0
        h = self.act(self.fc(self.act(h)) + 1.0)
        return self.head(self.act(self.fc(h) * 3.0))


def _prepared(tmp_path) -> fx.GraphModule:
    torch.manual_seed(0)
    model = SharedLinearNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = ql.prepare(model, example_inputs=(data(4),), method="fx", check_dir=tmp_path)
    assert isinstance(prepared, fx.GraphModule)
    return calibrate(prepared, [data(128) * 2.0])


def test_shared_weight_row_slice_equals_full_forward_and_direct(tmp_path) -> None:
    prepared = _prepared(tmp_path)
    x, metric = data(16, 3) * 2.0, resolve_metric("L1")
    targets = sensitivity_targets(prepared)
    weight = {t.op_name: t for t in targets if t.sensitive_type == "weight"}
    assert weight["fc"].nodes == weight["fc#1"].nodes  # one weight node, two call sites
    sliced = exact_sensitivity(prepared, (x,), metric, targets)
    assert sliced == exact_sensitivity(prepared, (x,), metric, targets, use_slice=False)
    direct = _direct_l1(prepared, x, weight["fc#1"])
    assert sliced[weight["fc#1"]]["0"] == pytest.approx(direct, rel=1e-9)
    assert sliced[weight["fc"]] == sliced[weight["fc#1"]]
    # the ReLU's later calls: every activation row equals a direct re-computation too
    acts = [t for t in targets if t.op_name.startswith("act") and t.sensitive_type == "activation"]
    assert acts
    for target in acts:
        assert sliced[target]["0"] == pytest.approx(_direct_l1(prepared, x, target), rel=1e-9)
    # the user-visible table: both rows of the one node carry its value
    (table,) = QuantAnalysis(prepared, out_dir=tmp_path / "qa").sensitivity(inputs=x, plot=False)
    rows = {r.op_name: r.metric for r in table.rows if r.sensitive_type == "weight"}
    assert rows["fc"] == rows["fc#1"] == pytest.approx(direct, rel=1e-9)
    approx = approximate_sensitivity(prepared, (x,), metric, targets, num_probes=2)
    assert approx[weight["fc"]] == approx[weight["fc#1"]]


# ---------------------------------------------------------------- hand-built: one activation op, two blocks
class _Block(nn.Module):
    """A leaf block (one fx node) running a gemm op, then an activation op."""

    def __init__(self, fc: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.fc = fc
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


class SharedActNet(nn.Module):
    """Two parallel blocks share one activation op instance (and, optionally, one gemm op)."""

    def __init__(self, share_fc: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        act = QElementwise("act", F.relu, "relu")
        fc = QLinear("b1.fc", 8, 16, producer="quant")
        self.quant = QInput("quant")
        self.b1 = _Block(fc, act)
        self.b2 = _Block(fc if share_fc else QLinear("b2.fc", 8, 16, producer="quant"), act)
        self.add = QElementwise("add", torch.add, "add")
        self.head = QLinear("head", 16, 4, producer="add")

    def forward(self, x):
        h = self.quant(x)
        return self.head(self.add(self.b1(h), self.b2(h * 0.5)))


class _BlockTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_Block, QInput, QLinear, QElementwise)) or super().is_leaf_module(m, qualname)


def _traced(share_fc: bool) -> fx.GraphModule:
    model = calibrate(SharedActNet(share_fc), [data(128)])
    return fx.GraphModule(model, _BlockTracer().trace(model))


@pytest.mark.parametrize("share_fc", [False, True])
def test_shared_activation_op_row_slice_equals_full_forward_and_direct(share_fc: bool) -> None:
    gm = _traced(share_fc)
    x, metric = data(16, 4), resolve_metric("L1")
    targets = sensitivity_targets(gm)
    act = next(t for t in targets if t.op_name == "act")
    assert act.nodes == (gm.b1.act.output_quant,) and gm.b2.act is gm.b1.act
    sliced = exact_sensitivity(gm, (x,), metric, targets)
    assert sliced == exact_sensitivity(gm, (x,), metric, targets, use_slice=False)
    assert sliced[act]["0"] == pytest.approx(_direct_l1(gm, x, act), rel=1e-9)
    if share_fc:
        fc = next(t for t in targets if t.op_name == "b1.fc" and t.sensitive_type == "weight")
        assert sliced[fc]["0"] == pytest.approx(_direct_l1(gm, x, fc), rel=1e-9)


def test_start_nodes_of_a_shared_node_are_all_its_calls(tmp_path) -> None:
    slicer = GraphSlicer(_traced(share_fc=False))
    starts = slicer.start_nodes_of([slicer.gm.b1.act.output_quant])
    assert [str(n.target) for n in starts] == ["b1", "b2"]
    prepared = _prepared(tmp_path)
    slicer = GraphSlicer(prepared)
    assert [str(n.target) for n in slicer.start_nodes_of([prepared.fc.weight_quant])] == ["fc", "fc#1"]
