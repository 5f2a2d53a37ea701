"""What a search probes (and prices) is what ``plan.setter`` builds, chip rules included (j6m).

Each test searches a small prepared model, then prepares the float model again with ``plan.setter`` (same
reference qconfig, same calibration data, same observer) and checks that the best probe's node dtypes,
metric and cost are those of the re-prepared model.
"""

from __future__ import annotations

import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis.search import search_fp16_topk, search_mixed_precision
from qat_lightning.analysis.search.precision_nodes import assignment_cost, collect_ops
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable

CHIP = "j6m"  # no int16 on both inputs of a gemm, no float16 gemm input


class Attention(nn.Module):
    """Two matmuls (scores, context) on linear projections."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x.view(-1, 8, 8))
        a = torch.softmax(torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * 0.25, -1)
        return self.head((torch.matmul(a, self.v(h)) + h).flatten(1))


class Chain(nn.Module):
    """fc1 -> relu -> fc2 -> fc3: fc2's input is left as produced (the producer's output dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2, self.fc3 = (
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.relu(self.fc1(x))))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 64, generator=g) * 2.0, torch.randn(128, 64, generator=g) * 2.0


def _prepare(float_model: nn.Module, setter: ql.QconfigSetter, calib: torch.Tensor) -> nn.Module:
    model = ql.prepare(float_model, example_inputs=(calib[:8],), qconfig_setter=setter)
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for i in range(0, len(calib), 64):
            model(calib[i : i + 64])
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    return model.eval()


def _view(model: nn.Module) -> dict[str, tuple]:
    """Every op's node dtypes as they stand: ``name -> (inputs, weight, output)``."""
    return {
        name: (
            tuple(n.dtype.name for n in op.inputs),
            op.weight.dtype.name if op.weight is not None else None,
            op.output.dtype.name if op.output is not None else None,
        )
        for name, op in collect_ops(model).items()
    }


class _Recorder:
    """``eval_fn``: mean absolute error to the float model (lower is better); keeps each probe's dtypes."""

    def __init__(self, float_model: nn.Module, x: torch.Tensor) -> None:
        self.x = x
        with torch.no_grad():
            self.ref = float_model(x)
        self.seen: dict[float, list[dict[str, tuple]]] = {}

    def __call__(self, model: nn.Module) -> float:
        with torch.no_grad():
            metric = (model(self.x) - self.ref).abs().mean().item()
        self.seen.setdefault(metric, []).append(_view(model))
        return metric


def _table(ops: list[str]) -> SensitivityTable:
    rows = tuple(
        SensitivityRow(n, "activation", "op", float(len(ops) - i), "qint8") for i, n in enumerate(ops)
    )
    return SensitivityTable(rows, "L1")


def _check_plan(plan, float_model: nn.Module, calib: torch.Tensor, recorder: _Recorder) -> None:
    rebuilt = _prepare(float_model, plan.setter, calib)
    probed = recorder.seen[plan.metric]
    assert probed == [_view(rebuilt)] * len(probed)  # the probe's dtypes are what the setter builds
    assert recorder(rebuilt) == plan.metric
    assert assignment_cost(collect_ops(rebuilt), {}, CHIP) == plan.cost


def test_mixed_precision_probes_the_matmul_the_setter_builds(one_thread) -> None:
    torch.manual_seed(0)
    float_model = Attention().eval()
    calib, val = _data()
    reference = ql.get_qconfig(observer="minmax")
    model = _prepare(float_model, ql.QconfigSetter(reference_qconfig=reference, chip=CHIP), calib)
    ops = collect_ops(model)
    matmuls = [n for n, op in ops.items() if op.info.is_matmul]
    assert len(matmuls) == 2
    # the matmuls and every producer of their inputs first: raised, both inputs of a matmul are qint16
    first = matmuls + [p for m in matmuls for p in ops[m].info.input_producers if p in ops]
    table = _table(list(dict.fromkeys(first + list(ops))))
    recorder = _Recorder(float_model, val)
    options = {"chip": CHIP, "reference_qconfig": reference, "method": "exact", "higher_is_better": False}
    low = recorder(model)
    full = search_mixed_precision(model, table, recorder, target=0.0, **options)  # unreachable: all raised
    assert not full.reached and full.metric < low and len(full.raised) == len(ops)
    _check_plan(full, float_model, calib, recorder)
    plan = search_mixed_precision(model, table, recorder, target=(low + full.metric) / 2, **options)
    assert plan.reached and {(m, "activation") for m in matmuls} <= set(plan.raised)
    _check_plan(plan, float_model, calib, recorder)
    rebuilt = _view(_prepare(float_model, plan.setter, calib))
    for m in matmuls:
        assert rebuilt[m][0][1] == "qint8"  # j6m: the second input of a matmul stays qint8


def test_fp16_topk_probes_the_gemm_input_the_setter_builds(one_thread) -> None:
    torch.manual_seed(0)
    float_model = Chain().eval()
    calib, val = _data()
    reference = ql.get_qconfig(observer="minmax", weight_dtype=ql.qint8, out_dtype=ql.qint16)
    model = _prepare(float_model, ql.QconfigSetter(reference_qconfig=reference, chip=CHIP), calib)
    ops = collect_ops(model)
    producer = ops["fc2"].info.input_producers[0]  # fc2's input is left as produced
    assert ops["fc2"].inputs[0].dtype == ql.float32 and producer in ops
    recorder = _Recorder(float_model, val)
    plan = search_fp16_topk(
        model,
        _table([producer, "fc3"]),
        recorder,
        target=0.0,  # unreachable: the best probe that beats all-int16 is kept (top-2 here)
        max_k=2,
        chip=CHIP,
        higher_is_better=False,
        reference_qconfig=reference,
    )
    assert not plan.reached and plan.raised == ((producer, "activation"), ("fc3", "activation"))
    assert plan.metric < plan.probes[0].metric  # it beats the all-int16 baseline
    _check_plan(plan, float_model, calib, recorder)
    rebuilt = _view(_prepare(float_model, plan.setter, calib))
    assert rebuilt[producer][2] == "float16" and rebuilt["fc2"][0] == ("qint16",)
    assert any(n.startswith(f"fc2: input.0 float16 (from {producer}) -> qint16") for n in plan.notes)
