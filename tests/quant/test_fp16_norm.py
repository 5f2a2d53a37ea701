"""fp16 norm ops: scaled formula exact in float64, fp32/FLOAT untouched, overflow fixed by scaling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.nodes.fp16_norm import (
    SAFE_AMAX,
    QatNormFunction,
    QatNormOp,
    fp16_group_norm,
    fp16_layer_norm,
    norm_input_scale,
    set_fp16_norm_scaling,
)
from qat_lightning.quant.nodes.switches import FakeCastSwitch
from qat_lightning.quant.ops import iter_quant_ops

HIDDEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add barrier waits


class Norms(nn.Module):
    """nn.LayerNorm, F.layer_norm and nn.GroupNorm on the model input."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.gn = nn.GroupNorm(4, 8)
        with torch.no_grad():
            for p in (*self.ln.parameters(), *self.gn.parameters()):
                p.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ln(x), F.layer_norm(x, (HIDDEN,), eps=1e-5), self.gn(x.reshape(-1, 8, HIDDEN // 8))


def _prepare(dtype, method: str = "fx", model: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    model = Norms().eval() if model is None else model
    chip = "j6p" if dtype == ql.float16 else None  # j6p keeps fp32 for a few nonlinear ops only
    # eager mode cannot see F.layer_norm: a float32 op on j6p, accepted (with a warning) by "downgrade"
    policy = "downgrade" if method == "eager" else "error"
    setter = ql.QconfigSetter(
        ql.get_qconfig(), [ql.ModuleNameTemplate({"": dtype})], chip=chip, on_violation=policy
    )
    x = torch.randn(4, HIDDEN)
    return model, ql.prepare(model, example_inputs=x, qconfig_setter=setter, method=method)


def _big_input() -> torch.Tensor:
    """|x - mean| ~ 1e3: the fp16 variance term (x - mean)^2 ~ 1e6 overflows 65504."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, HIDDEN, generator=g) * 1000.0 + 500.0


@torch.no_grad()
def _max_err(outs, refs) -> float:
    return max(float((o.double() - r.double()).abs().max()) for o, r in zip(outs, refs, strict=True))


@pytest.mark.parametrize(
    ("amax", "k"), [(0.0, 1.0), (1.0, 1.0), (64.0, 1.0), (65.0, 0.5), (1000.0, 2.0**-4), (65504.0, 2.0**-10)]
)
def test_input_scale_is_a_power_of_two_never_upscaling(amax, k):
    x = torch.tensor([amax, -amax / 3, 0.0])
    scale = norm_input_scale(x)
    assert float(scale) == k and float(scale) * amax <= SAFE_AMAX


def test_scaled_formula_equals_torch_norms_in_float64():
    x = _big_input().double()
    w, b = torch.rand(HIDDEN, dtype=torch.float64) + 0.5, torch.randn(HIDDEN, dtype=torch.float64)
    assert float(norm_input_scale(x)) < 2.0**-5  # the scaled path really runs
    exact = fp16_layer_norm(x, (HIDDEN,), w, b, 1e-5, auto_scale=True, cast=lambda t: t)
    assert float((exact - F.layer_norm(x, (HIDDEN,), w, b, 1e-5)).abs().max()) < 1e-12
    x3, wg, bg = x.reshape(-1, 8, HIDDEN // 8), w[:8], b[:8]
    exact = fp16_group_norm(x3, 4, wg, bg, 1e-5, auto_scale=True, cast=lambda t: t)
    assert float((exact - F.group_norm(x3, 4, wg, bg, 1e-5)).abs().max()) < 1e-12


def test_norm_ops_are_built_with_scaling_on():
    _, prepared = _prepare(ql.float16)
    ops = dict(iter_quant_ops(prepared))
    assert isinstance(ops["ln"], QatNormOp) and isinstance(ops["gn"], QatNormOp)
    assert isinstance(ops["layer_norm"], QatNormFunction)
    assert all(ops[n].fp16_input_scaling for n in ("ln", "gn", "layer_norm"))
    assert "fp16_input_scaling=True" in repr(ops["ln"])


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_fp32_config_and_float_state_are_bit_identical(method):
    model, fp32 = _prepare(ql.float32, method)
    x = _big_input()
    refs = model(x)
    ql.set_fake_quantize(fp32, "validation")
    assert all(torch.equal(o, r) for o, r in zip(fp32(x), refs, strict=True))
    _, fp16 = _prepare(ql.float16, method, model)
    for state in ("float", "calibration"):
        ql.set_fake_quantize(fp16, state)
        assert all(torch.equal(o, r) for o, r in zip(fp16(x), refs, strict=True))
    ql.set_fake_quantize(fp16, "validation")
    with FakeCastSwitch.disabled():
        assert all(torch.equal(o, r) for o, r in zip(fp16(x), refs, strict=True))


def test_fp16_overflows_without_scaling_and_matches_float_with_it():
    model, prepared = _prepare(ql.float16)
    ql.set_fake_quantize(prepared, "validation")
    x = _big_input()
    refs = model(x.double().float())
    assert set_fp16_norm_scaling(prepared, False) == ["ln", "layer_norm", "gn"]
    err_off = _max_err(prepared(x), refs)
    set_fp16_norm_scaling(prepared, True)
    err_on = _max_err(prepared(x), refs)
    assert err_off > 1.0  # the saturated variance squeezes the output: garbage
    assert err_on < 1e-2  # fp16 rounding only (outputs ~1: fp16 spacing ~1e-3)


def test_small_inputs_are_not_rescaled_but_still_run_in_fp16():
    model, prepared = _prepare(ql.float16)
    ql.set_fake_quantize(prepared, "validation")
    x = torch.randn(16, HIDDEN) * 10.0
    on = prepared(x)
    set_fp16_norm_scaling(prepared, False)
    assert all(torch.equal(a, b) for a, b in zip(on, prepared(x), strict=True))  # k = 1
    assert 0 < _max_err(on, model(x)) < 1e-2


def test_set_scaling_by_prefix_and_gradient_in_qat():
    _, prepared = _prepare(ql.float16)
    assert set_fp16_norm_scaling(prepared, False, prefix="gn") == ["gn"]
    ops = dict(iter_quant_ops(prepared))
    assert not ops["gn"].fp16_input_scaling and ops["ln"].fp16_input_scaling
    x = _big_input().requires_grad_()
    ql.set_fake_quantize(prepared, "qat")
    prepared(x)[0].pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and ops["ln"].module.weight.grad is not None


def _quiet_and_outlier_rows() -> torch.Tensor:
    """Rows of std 0.003 and 0.01 beside a row with a 1500 outlier (max|x| > 1024: the scaling runs)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, HIDDEN, generator=g)
    x[0] *= 0.003
    x[1] *= 0.01
    x[2, 0] = 1500.0
    return x


def _row_errors(got: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per row: max |got - ref| relative to the row's max |ref| (the fp16 spacing there is ~1e-3)."""
    got, ref = got.double().reshape(3, -1), ref.reshape(3, -1)
    return [float(e) for e in ((got - ref).abs().amax(1) / ref.abs().amax(1))]


def test_scaling_for_an_outlier_row_keeps_quiet_rows_right():
    x = _quiet_and_outlier_rows()
    assert float(norm_input_scale(x)) == 2.0**-5  # the tensor needs scaling
    ref = F.layer_norm(x.double(), (HIDDEN,), eps=1e-5)
    on = _row_errors(fp16_layer_norm(x, (HIDDEN,), eps=1e-5), ref)
    off = _row_errors(fp16_layer_norm(x, (HIDDEN,), eps=1e-5, auto_scale=False), ref)
    assert max(on) < 2e-3, on  # every row, the quiet ones included, within fp16 precision
    assert off[2] > 0.5 and max(off[:2]) < 2e-3  # unscaled: the outlier row saturates, quiet rows fine
    x3 = x.reshape(3, 8, HIDDEN // 8)  # GroupNorm, one group per sample: the same rows
    ref = F.group_norm(x3.double(), 1, eps=1e-5)
    assert max(_row_errors(fp16_group_norm(x3, 1, eps=1e-5), ref)) < 2e-3


def test_scaled_group_norm_keeps_a_quiet_group_beside_an_outlier_group():
    x = _quiet_and_outlier_rows().reshape(1, 3, HIDDEN)  # one sample, a group per channel
    ref = F.group_norm(x.double(), 3, eps=1e-5)
    got = fp16_group_norm(x, 3, eps=1e-5)
    assert max(_row_errors(got.reshape(3, HIDDEN), ref.reshape(3, HIDDEN))) < 2e-3


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_prepared_norms_keep_quiet_rows_right_in_validation(method):
    model, prepared = _prepare(ql.float16, method)
    ql.set_fake_quantize(prepared, "validation")
    x = _quiet_and_outlier_rows()
    with torch.no_grad():
        refs = copy.deepcopy(model).double()(x.double())
        outs = prepared(x)
    for out, ref in zip(outs, refs, strict=True):
        errors = _row_errors(out, ref)
        assert max(errors) < 3e-3, errors
