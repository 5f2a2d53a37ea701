"""Eager prepare reports what its ops really read: in-place changes, functional views, every float op."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.ops import iter_quant_ops
from qat_lightning.quant.preparation.model_check import dtype_op_shares


def _prepare(model: nn.Module, x: torch.Tensor, method: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ql.prepare(model.eval(), example_inputs=(x,), method=method)


def _validation_inputs(
    prepared: nn.Module, x: torch.Tensor, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Calibrate, switch to VALIDATION and return what the ops ``names`` read (their first input)."""
    ql.set_fake_quantize(prepared, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        prepared(x)
    ql.set_fake_quantize(prepared, ql.FakeQuantState.VALIDATION)
    ops = dict(iter_quant_ops(prepared))
    seen: dict[str, torch.Tensor] = {}
    handles = [
        ops[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        prepared(x)
    for h in handles:
        h.remove()
    return seen


def _off_grid(values: torch.Tensor, scale: torch.Tensor) -> float:
    q = values / scale
    return (q - q.round()).abs().max().item()


# ---- 1. in-place ops on a quantized op's output ---------------------------------------------------------


class AddInplaceMethod(nn.Module):  # y.add_(z), the result not rebound (torchvision style)
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        y.add_(self.d(x))
        return self.c2(y)


class IAdd(nn.Module):  # ResNet's out += identity
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        y += self.d(x)
        return self.c2(y)


class SEInplace(nn.Module):  # squeeze-excite with x.mul_(w)
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.c(x)
        x.mul_(torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True))))
        return self.c2(x)


class HardtanhInplace(nn.Module):  # F.hardtanh(..., inplace=True), through a view
    def __init__(self) -> None:
        super().__init__()
        self.c, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        F.hardtanh(y.view(-1), -0.3, 0.3, inplace=True)
        return self.c2(y)


@pytest.mark.parametrize("model_cls", [AddInplaceMethod, IAdd, SEInplace, HardtanhInplace])
def test_a_consumer_of_an_in_place_result_is_reported_as_what_it_reads(model_cls: type) -> None:
    x = torch.randn(2, 3, 8, 8)
    prepared = _prepare(model_cls(), x, "eager")
    seen = _validation_inputs(prepared, x, ("c2",))
    ops = dict(iter_quant_ops(prepared))
    row = next(r for r in ql.check_model(prepared).out_qconfigs if r.name == "c2")
    (producer,) = ops["c2"].op_info.input_producers
    if row.input_dtype == "qint8" and producer is not None:
        assert _off_grid(seen["c2"], ops[producer].output_quant.scale) < 1e-3
    else:
        assert row.input_dtype == "float32"
    # eager quantizes no functional op: c2 reads float32 (c's output changed in place), and a note says why
    assert producer is None and row.input_dtype == "float32"
    assert any("c2: input 0 is the output of c changed in place" in n for n in prepared.prepare_record.notes)


class ReadBeforeChange(nn.Module):
    """``c3`` reads ``c``'s output before the in-place add, ``c2`` after; an in-place ReLU module follows."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.c2, self.c3, self.c4 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c(x)
        before = self.c3(y)
        y += self.d(x)
        after = self.c2(y)
        return before + after + self.c4(self.relu(y))


def test_in_place_changes_are_seen_in_call_order_and_an_in_place_module_is_the_producer() -> None:
    x = torch.randn(2, 3, 8, 8)
    prepared = _prepare(ReadBeforeChange(), x, "eager")
    ops = dict(iter_quant_ops(prepared))
    assert ops["c3"].op_info.input_producers == ("c",)  # read before the change
    assert ops["c2"].op_info.input_producers == (None,)
    assert ops["relu"].op_info.input_producers == (None,)
    assert ops["c4"].op_info.input_producers == ("relu",)  # the in-place op eager quantizes
    seen = _validation_inputs(prepared, x, ("c3", "c4"))
    assert _off_grid(seen["c3"], ops["c"].output_quant.scale) < 1e-3
    assert _off_grid(seen["c4"], ops["relu"].output_quant.scale) < 1e-3


# ---- 2. every float op fx lists is in eager's report --------------------------------------------------


class Unlisted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = F.pad(y, (1, 1, 1, 1))
        y = torch.clamp(y, -1, 3)
        y = torch.where(y > 0, y, y * 0.5)
        t = self.out(y).flatten(2)
        g = torch.einsum("bcn,bdn->bcd", t, t)
        return torch.stack([g, g.amax(-1, keepdim=True).expand_as(g)], 0)


def test_eager_reports_every_op_fx_lists() -> None:
    x = torch.randn(2, 3, 8, 8)
    fx, eager = _prepare(Unlisted(), x, "fx"), _prepare(Unlisted(), x, "eager")
    fx_ops = {op.op_info.op_type for _, op in iter_quant_ops(fx)} | {
        op.op_type for op in fx.prepare_record.float_ops
    }
    record = eager.prepare_record
    eager_ops = {op.op_info.op_type for _, op in iter_quant_ops(eager)} | {
        op.op_type for op in record.float_ops
    }
    assert fx_ops >= {"cat", "stack", "pad", "clamp", "where", "einsum", "amax", "mul"}
    assert fx_ops <= eager_ops
    not_covered = {entry.split(" (")[1].rstrip(")") for entry in record.not_covered}
    assert {"cat", "stack", "pad", "clamp", "where", "einsum", "amax", "mul"} <= not_covered
    reasons = {op.op_type: op.reason for op in record.float_ops}
    assert "eager mode cannot quantize" in reasons["cat"] and "no quantized implementation" in reasons["pad"]
    # data movement is not a float op (flatten, expand_as), nor the bool mask (y > 0)
    assert not {"flatten", "expand_as", "gt"} & set(reasons)


# ---- 3. gemms fed through functional views -------------------------------------------------------------


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.c2, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8 * 64, 4)

    def forward(self, x):
        x = self.c(x)
        b, c, h, w = x.shape
        x = self.c2(x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w))  # channel shuffle
        return self.fc(torch.flatten(x, 1)[:, :])


def test_eager_looks_through_functional_views_as_fx_does() -> None:
    x = torch.randn(2, 3, 8, 8)
    reports = {}
    for method in ("fx", "eager"):
        prepared = _prepare(Shuffle(), x, method)
        seen = _validation_inputs(prepared, x, ("c2", "fc"))
        ops = dict(iter_quant_ops(prepared))
        rows = {r.name: r.input_dtype for r in ql.check_model(prepared).out_qconfigs}
        producers = {n: ops[n].op_info.input_producers for n in ("c2", "fc")}
        assert producers == {"c2": ("c",), "fc": ("c2",)}
        assert _off_grid(seen["c2"], ops["c"].output_quant.scale) < 1e-3
        assert _off_grid(seen["fc"], ops["c2"].output_quant.scale) < 1e-3
        shares = {k: v for k, v in dtype_op_shares(prepared).items() if v}
        reports[method] = (producers, rows["c2"], rows["fc"], shares, ql.not_quantized_share(prepared))
    assert reports["eager"] == reports["fx"]
    assert reports["eager"][1:3] == ("qint8", "qint8") and reports["eager"][4] == (0, 0.0)
