"""qat_lightning.quant.qat in plain torch: warmup detection, input/output nodes, BatchNorm freezing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.qat import activation_nodes, find_lr_warmup, freeze_batchnorm, io_quant_nodes


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def test_find_lr_warmup_names_the_rising_schedules_only() -> None:
    opt = _optimizer()
    assert "LinearLR rises" in find_lr_warmup(torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=5))
    assert find_lr_warmup(torch.optim.lr_scheduler.CosineAnnealingLR(_optimizer(), T_max=10)) is None
    rising = torch.optim.lr_scheduler.LambdaLR(_optimizer(), lambda s: min(1.0, (s + 1) / 10))
    assert "factor rises from 0.1 at step 0" in find_lr_warmup(rising)


def test_io_and_activation_nodes_of_a_prepared_model() -> None:
    model = ql.prepare(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), example_inputs=(torch.randn(2, 4),)
    )
    io_names = [name for name, _ in io_quant_nodes(model)]
    acts = [name for name, _ in activation_nodes(model)]
    assert io_names and set(io_names) <= set(acts)
    assert all(node.ch_axis is None and node.dtype.is_integer for _, node in activation_nodes(model))
    assert len(io_names) < len(acts)  # inner activations are not input/output nodes


def test_freeze_batchnorm_returns_the_previous_modes() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3)))
    model.train()
    model[2][0].eval()
    saved = freeze_batchnorm(model)
    assert [was for _, was in saved] == [True, False]
    assert not model[1].training and not model[2][0].training and model[0].training


# ------------------------------------------------------------------- io nodes: eager agrees with fx
class FunctionalChain(nn.Module):
    """Linear -> F.relu -> Linear -> F.relu -> Linear: eager sees the linears only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class ResidualBranch(nn.Module):
    """A residual add, a branch feeding two ops, attention-like matmuls, a cat with the raw input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Linear(4, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8 + 4, 3)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.norm(self.body(h) + h)  # residual
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(0, 1), dim=-1)  # branch: q and k
        feat = torch.cat([(attn @ h).flatten(1), x * 0.5], dim=1)
        return self.head(feat), self.aux(h.mean(dim=0, keepdim=True))


def _io_names(model: nn.Module, method: str) -> list[str]:
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(observer="minmax"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = ql.prepare(
            model.eval(), example_inputs=torch.randn(5, 4), qconfig_setter=setter, method=method
        )
    return [name for name, _ in io_quant_nodes(prepared)]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (FunctionalChain, ["x_quant.output_quant", "c.output_quant"]),
        (ResidualBranch, ["x_quant.output_quant", "head.output_quant", "aux.output_quant"]),
    ],
    ids=["functional_chain", "residual_branch"],
)
def test_io_nodes_of_an_eager_model_are_those_of_the_fx_model(model, expected) -> None:
    float_model = model()
    assert _io_names(float_model, "fx") == expected
    assert _io_names(float_model, "eager") == expected  # not every linear before a functional op


class FromNumpy(nn.Module):
    """The activation leaves torch through numpy: the probe cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.from_numpy(self.a(x).detach().numpy() * 2.0))


class NoFunctionMode(FunctionalChain):
    """Refuses to run under a TorchFunctionMode (the probe that follows the data flow)."""

    def forward(self, x):
        if torch._C._is_torch_function_mode_enabled():
            raise RuntimeError("no modes here")
        return super().forward(x)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (FromNumpy, "the output of a goes into code the probe run cannot follow"),
        (NoFunctionMode, "no modes here"),
    ],
    ids=["untraced", "probe_failed"],
)
def test_io_nodes_refuse_an_eager_model_whose_data_flow_is_unknown(model, why) -> None:
    with pytest.raises(ValueError, match=rf"method='eager'[\s\S]*{why}[\s\S]*set_qat_scales\(model, 'fixed'"):
        _io_names(model(), "eager")


class SliceWrite(nn.Module):
    """``out[:, :2] = a(x)``: fx cannot trace it, ``auto`` falls back to eager."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        out = torch.zeros(x.shape[0], 4)
        out[:, :2] = self.a(x)
        out[:, 2:] = x[:, :2]
        return self.b(out)


def test_io_nodes_of_the_auto_fallback_follow_slice_writes() -> None:
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(observer="minmax"))
    with pytest.warns(UserWarning, match="fell back to eager"):
        prepared = ql.prepare(SliceWrite().eval(), example_inputs=torch.randn(3, 4), qconfig_setter=setter)
    assert prepared.prepare_record.method == "eager"
    assert [name for name, _ in io_quant_nodes(prepared)] == ["x_quant.output_quant", "b.output_quant"]
