"""fp16 diagnosis and shared-module advice after AdaRound: their float forward is the original float model.

AdaRound writes rounded weights into the float weights; the advice runs inside ``float_reference``, so
every number it reports equals the one recomputed on a copy of the prepared model taken before AdaRound.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.analysis.advice.fp16 import FP16_MAX, diagnose_fp16
from qat_lightning.analysis.advice.shared import shared_module_advice
from qat_lightning.ptq import AdaRoundConfig, adaround
from tests.ptq.models import calibrated

pytestmark = pytest.mark.usefixtures("one_thread")


class Wide(nn.Module):
    """fc1 -> relu -> fc2 with large weights: fc2's output (and fc1's) beyond the fp16 range."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight.mul_(40.0)
            self.fc2.weight.mul_(40.0)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fc2(F.relu(self.fc1(x)))


class SharedFc(nn.Module):
    """``fc`` called twice (ops ``fc`` and ``fc#1``) on different inputs, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(F.relu(self.fc(x)) + self.fc(3.0 * x + 1.0))


def _rounded(model: nn.Module, scale: float) -> tuple[nn.Module, nn.Module, list[Tensor]]:
    """Calibrated ``model`` after AdaRound, its copy from before AdaRound, the batches."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 8, generator=gen) * scale for _ in range(3)]
    torch.manual_seed(0)
    qm = calibrated(model.eval(), xs)
    reference = copy.deepcopy(qm)
    adaround(qm, xs, config=AdaRoundConfig(iterations=20))
    assert set(ql.ptq.original_float_parameters(qm))  # AdaRound overwrote float weights
    return qm, reference, xs


def _float_io(model: nn.Module, x: Tensor, names: set[str] | None = None) -> dict[str, tuple[list, Tensor]]:
    """Per op of ``model`` in FLOAT on ``x``: its floating-point inputs and its output (first call)."""
    seen: dict[str, tuple[list, Tensor]] = {}
    handles = []
    for name, op in ql.iter_quant_ops(model):
        if names is None or name in names:

            def hook(_m, args, out, name=name):
                ins = [a.detach().double() for a in args if isinstance(a, Tensor) and a.is_floating_point()]
                seen.setdefault(name, (ins, out.detach().double()))

            handles.append(op.register_forward_hook(hook))
    with torch.no_grad(), ql.fake_quant_state(model, ql.FakeQuantState.FLOAT):
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_fp16_overflow_values_are_the_float_models() -> None:
    qm, reference, xs = _rounded(Wide(), 100.0)
    x = xs[0]
    expected = {}
    for name, (ins, out) in _float_io(reference, x).items():
        amax = max(float(t.abs().max()) for t in (*ins, out))
        if amax > FP16_MAX:
            expected[name] = amax
    assert "fc2" in expected  # an overflow that depends on the rounded weights
    got = {f.op_name: f.value for f in diagnose_fp16(qm, x).findings if f.kind == "overflow"}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_shared_module_statistics_are_the_float_models() -> None:
    qm, reference, xs = _rounded(SharedFc(), 1.0)
    x = xs[0]
    (finding,) = shared_module_advice(qm, x).findings
    seen = _float_io(reference, x, {"fc", "fc#1"})
    assert [s.op_name for s in finding.sites] == ["fc", "fc#1"]
    for site in finding.sites:
        out = seen[site.op_name][1]
        mean = float(out.mean())
        std = math.sqrt(max(float((out * out).mean()) - mean**2, 0.0))
        assert site.min == pytest.approx(float(out.min()), rel=1e-6, abs=1e-7), site.op_name
        assert site.max == pytest.approx(float(out.max()), rel=1e-6, abs=1e-7), site.op_name
        assert site.mean == pytest.approx(mean, rel=1e-6, abs=1e-7), site.op_name
        assert site.std == pytest.approx(std, rel=1e-6, abs=1e-7), site.op_name
