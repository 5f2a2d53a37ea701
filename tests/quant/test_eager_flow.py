"""Eager prepare follows the data flow through the functional code between the ops (eager_flow)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant import dynamic_block
from qat_lightning.quant.preparation.eager_flow import connects, eager_dataflow
from qat_lightning.quant.preparation.eager_probe import probe_model


def _prepare(model: nn.Module, x: torch.Tensor, method: str = "eager") -> nn.Module:
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(observer="minmax"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ql.prepare(model.eval(), example_inputs=x, qconfig_setter=setter, method=method)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.c(self.drop(F.gelu(self.b(F.relu(self.a(x)).flatten(1)))))


class InplaceResidual(nn.Module):
    """torchvision's ``out += identity`` followed by an in-place ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.a(x)
        out = self.b(identity)
        out += identity
        return self.c(self.relu(out))


class Loop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        for _ in range(x.shape[0]):
            with dynamic_block():
                x = torch.tanh(self.fc(x))
        return self.head(x)


def test_producers_are_followed_through_functions_and_pass_through_modules() -> None:
    prepared = _prepare(Chain(), torch.randn(3, 4))
    ops = dict(ql.iter_quant_ops(prepared))
    assert ops["b"].op_info.input_producers == (None,)  # the op records stop at F.relu ...
    flow = eager_dataflow(prepared)
    assert flow is not None and flow.error is None and flow.untraced == ()
    assert dict(flow.producers) == {
        "x_quant": (),
        "a": ("x_quant",),
        "b": ("a",),
        "c": ("b",),
    }  # ... the flow not
    assert flow.consumed() == {"x_quant", "a", "b"}


def test_an_in_place_add_feeds_both_producers_on() -> None:
    flow = eager_dataflow(_prepare(InplaceResidual(), torch.randn(3, 4)))
    assert flow.producers["b"] == ("a",)
    assert flow.producers["relu"] == ("a", "b")
    assert flow.producers["c"] == ("relu",)


def test_a_dynamic_op_feeding_itself_is_not_consumed_by_itself() -> None:
    flow = eager_dataflow(_prepare(Loop(), torch.randn(3, 4)))
    assert flow.producers["fc"] == ("fc", "x_quant")
    assert flow.producers["head"] == ("fc",)
    assert flow.consumed() == {"x_quant", "fc"}


class ModeShy(Chain):
    def forward(self, x):
        if torch._C._is_torch_function_mode_enabled():
            raise RuntimeError("no modes here")
        return super().forward(x)


def test_an_unrecorded_flow_is_kept_as_an_error_and_noted() -> None:
    prepared = _prepare(ModeShy(), torch.randn(3, 4))
    flow = eager_dataflow(prepared)
    assert flow.producers == {} and "TorchFunctionMode failed" in flow.error and "no modes here" in flow.error
    assert any("data flow between the ops unknown" in note for note in prepared.prepare_record.notes)


def test_only_eager_models_carry_a_flow_and_only_the_function_probe_records_one() -> None:
    assert eager_dataflow(_prepare(Chain(), torch.randn(3, 4), method="fx")) is None
    x = torch.randn(3, 4)
    assert probe_model(Chain().eval(), (x,), {}, record_functions=False).flow is None
    flow = probe_model(Chain().eval(), (x,), {}).flow
    assert flow.calls[("a", 0)] == {"x"} and flow.calls[("b", 0)] == {("a", 0)}
    assert flow.outputs == {("c", 0)}


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (F.relu, True),
        (torch.cat, True),
        (torch.flatten, True),
        (torch.Tensor.add, True),
        (torch.Tensor.__radd__, True),
        (torch.Tensor.__getitem__, True),
        (torch.Tensor.view, True),
        (torch.Tensor.abs, False),
        (torch.Tensor.__neg__, False),
        (torch.zeros, False),
    ],
)
def test_the_flow_runs_through_what_fx_quantizes_or_looks_through(func, expected) -> None:
    assert connects(func) is expected
