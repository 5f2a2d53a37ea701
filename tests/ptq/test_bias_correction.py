"""bias_correction: the mean output error of each conv / linear op is zero on its batches afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.ptq import bias_correction
from qat_lightning.quant.nodes.int_bias import _bias_nodes
from tests.ptq.models import calibrated


class _Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 4)
        self.c = nn.Linear(4, 4, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.c(self.b(self.a(x)))


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, bias=False)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.bn(self.conv(x))


def _data(shape: tuple[int, ...]) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    # skewed inputs with rare large values: the mse observer clips them, a biased error
    return [torch.rand(*shape, generator=gen).pow(4) * 10 for _ in range(4)]


def _op_outputs(model: nn.Module, xs: list[Tensor], state: ql.FakeQuantState) -> dict[str, list[Tensor]]:
    """Per gemm op, its outputs (float64) on ``xs`` in ``state`` (its own output quant node off)."""
    outs: dict[str, list[Tensor]] = {}
    for name, op in ql.iter_quant_ops(model):
        if getattr(op, "weight_quant", None) is None:
            continue
        seen: list[Tensor] = []
        handle = op.register_forward_hook(lambda _m, _a, y, seen=seen: seen.append(y.double()))
        with ql.fake_quant_state(model, state), ql.fake_quant_state(op.output_quant, ql.FakeQuantState.FLOAT):
            with torch.no_grad():
                for x in xs:
                    model(x)
        handle.remove()
        outs[name] = seen
    return outs


def _mean_errors(
    reference: dict[str, list[Tensor]], qm: nn.Module, xs: list[Tensor], dim: int
) -> dict[str, Tensor]:
    """Per gemm op: mean over the batches of (quantized - float reference) output, per channel."""
    quant = _op_outputs(qm, xs, ql.FakeQuantState.VALIDATION)
    return {
        name: torch.cat(
            [
                (q - f).movedim(dim, -1).reshape(-1, q.shape[dim])
                for q, f in zip(quant[name], ref, strict=True)
            ]
        ).mean(0)
        for name, ref in reference.items()
    }


@pytest.mark.parametrize(("model_cls", "shape", "dim"), [(_Linears, (16, 6), -1), (_ConvBn, (8, 3, 6, 6), 1)])
def test_mean_output_error_is_zeroed(model_cls: type[nn.Module], shape: tuple[int, ...], dim: int) -> None:
    xs = _data(shape)
    qm = calibrated(model_cls(), xs)
    reference = _op_outputs(qm, xs, ql.FakeQuantState.FLOAT)  # the float function, before any change
    before = _mean_errors(reference, qm, xs, dim)
    assert max(float(e.abs().max()) for e in before.values()) > 1e-3
    result = bias_correction(qm, xs)
    skipped = dict(result.skipped)
    assert [r.name for r in result.rows] + list(skipped) == list(before)
    if model_cls is _Linears:
        assert "no bias" in skipped["c"]
    after = _mean_errors(reference, qm, xs, dim)
    ops = dict(ql.iter_quant_ops(qm))
    for name, err in after.items():
        if name in skipped:
            continue
        # VALIDATION adds the deployed int32 bias (prepare's int_bias): the measured error holds the old
        # bias rounding and the corrected bias is rounded again, so the mean error is zeroed to within one
        # int32 bias step s_in * s_w (|new rounding - old rounding|)
        op = ops[name]
        bias = op.module.bias if hasattr(op, "module") else op._folded()[1]
        nodes = _bias_nodes(op, bias)
        step = 0.0 if nodes is None else float((nodes[0].scale * nodes[1].scale).max())
        assert float(err.abs().max()) < step + 1e-5 * max(1.0, float(before[name].abs().max())), name


def test_refuses_uncalibrated_model_and_empty_loader() -> None:
    xs = _data((4, 6))
    qm = ql.prepare(_Linears().eval(), example_inputs=xs[0])
    with pytest.raises(ValueError, match="calibrate the model first"):
        bias_correction(qm, xs)
    qm = calibrated(_Linears(), xs)
    with pytest.raises(ValueError, match="no batch"):
        bias_correction(qm, [])
    with pytest.raises(ValueError, match="num_batches"):
        bias_correction(qm, xs, num_batches=0)
    with pytest.raises(ValueError, match="no prepared conv / linear op"):
        bias_correction(nn.Sequential(nn.ReLU()), xs)
