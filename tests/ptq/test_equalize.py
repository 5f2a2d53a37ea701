"""equalize: the float function is kept (float64), ranges even out, bad input is refused."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.ptq import EQUALIZE_KINDS, equalize
from tests.ptq.models import AttentionBlock, ConvChain, perturb


def _batches(shape: tuple[int, ...], n: int = 3, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize(
    ("model_cls", "shape", "kinds"),
    [(ConvChain, (8, 2, 6, 6), {"cross_layer"}), (AttentionBlock, (8, 5, 8), set(EQUALIZE_KINDS))],
)
def test_function_preserved_in_float64(
    model_cls: type[nn.Module], shape: tuple[int, ...], kinds: set[str]
) -> None:
    model = perturb(model_cls()).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = _batches(shape)
    reference = [model(x) for x in xs]
    result = equalize(model, xs, tolerance=1e-9)
    assert {g.kind for g in result.groups if g.applied} == kinds
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # parameters really moved
    for x, ref in zip(xs, reference, strict=True):
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)


def test_cross_layer_equalizes_ranges() -> None:
    model = perturb(ConvChain()).double()
    equalize(model, _batches((8, 2, 6, 6)), kinds=["cross_layer"], cle_rounds=20)
    out_range = model.c2.weight.detach().abs().amax((1, 2, 3))
    in_range = model.c3.weight.detach().abs().amax((0, 2, 3))
    torch.testing.assert_close(out_range, in_range, rtol=1e-3, atol=0.0)  # the chain c1-c2-c3 has settled


def test_layernorm_alpha_search_lowers_the_consumers_error() -> None:
    model = perturb(AttentionBlock()).double()
    result = equalize(model, _batches((8, 5, 8)), kinds=["layernorm"], alphas=[0.5, 0.8])
    applied = [g for g in result.groups if g.applied]
    assert applied and all(g.error_after < g.error_before and g.alpha in (0.5, 0.8) for g in applied)


class _MismatchedHeads(AttentionBlock):
    """k is split into heads with another channel order than q: per-feature scales do not commute."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        b, n, d = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(h).view(b, n, d // self.heads, self.heads).permute(0, 3, 2, 1)
        return torch.matmul(q, k).sum((1, 2, 3)).unsqueeze(1)


def test_matmul_group_that_does_not_commute_is_not_applied() -> None:
    model = perturb(_MismatchedHeads()).double()
    xs = _batches((8, 5, 8))
    reference = model(xs[0])
    result = equalize(model, xs, kinds=["matmul"], tolerance=1e-9)
    (group,) = result.groups
    assert not group.applied  # the search charges the changed float output, the check would undo it
    torch.testing.assert_close(model(xs[0]), reference, rtol=0, atol=0)


def test_refuses_prepared_model_and_bad_arguments() -> None:
    model = ConvChain().eval()
    xs = _batches((4, 2, 6, 6), dtype=torch.float32)
    prepared = ql.prepare(ConvChain().eval(), example_inputs=xs[0])
    with pytest.raises(ValueError, match="before ql.prepare"):
        equalize(prepared, xs)
    with pytest.raises(ValueError, match="allowed: cross_layer, layernorm, matmul"):
        equalize(model, xs, kinds=["cle"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        equalize(model, xs, alphas=[1.5])
    with pytest.raises(ValueError, match="no batch"):
        equalize(model, [])
    with pytest.raises(ValueError, match="qint8 or qint16"):
        equalize(model, xs, dtype="float16")


def test_change_beyond_tolerance_is_undone_exactly() -> None:
    model = perturb(AttentionBlock())  # float32: rescaling moves the output by ~1e-7, over a 1e-12 tolerance
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = equalize(model, _batches((8, 5, 8), dtype=torch.float32), tolerance=1e-12)
    undone = [g for g in result.groups if "undone" in g.note]
    assert undone and not any(g.applied for g in result.groups if g.kind == "cross_layer")
    for g in undone:
        assert g.error_after == g.error_before
    applied = [g for g in result.groups if g.applied]  # e.g. "q @ k -> matmul" (exact power-of-2 rescaling)
    for key in ("ln1.weight", "q.weight", "fc1.weight", "fc2.weight"):
        layer = key.split(".")[0]
        touched = any(layer in _layers(g.name) for g in applied)
        if any(layer in _layers(g.name) for g in undone) and not touched:
            torch.testing.assert_close(model.state_dict()[key], before[key], rtol=0, atol=0)


def _layers(group_name: str) -> set[str]:
    """The layer names in a group's name (``"ln1 -> q, k, v"``, ``"q @ k -> matmul"``)."""
    return set(re.findall(r"[A-Za-z_][\w.]*", group_name))


def test_train_mode_model_keeps_its_bn_statistics_and_flags() -> None:
    model = perturb(ConvChain()).double().train()
    stats = model.bn1.running_mean.clone()
    equalize(model, _batches((8, 2, 6, 6)))
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(model.bn1.running_mean, stats, rtol=0, atol=0)
