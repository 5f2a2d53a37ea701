"""qat_lightning.quant.nodes.functional: fake_quantize / fake_cast against torch's reference kernels."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qat_lightning.quant.backends import cpu_kernels, set_backend
from qat_lightning.quant.dtypes import QuantDtype, float16, float32, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, set_fake_quantize
from qat_lightning.quant.nodes.functional import (
    FP16_MAX,
    _keep_mask,
    _lower_keep_bound,
    fake_cast,
    fake_quantize,
    quantize_tensor,
)
from tests.tracing import saved_for_backward

INT_DTYPES = [qint8, qint16]


@pytest.fixture(autouse=True, scope="module", params=["cpu_kernels", "default"])
def implementation(request):
    """Every test runs twice: the opt-in C-kernel backend (when built) and the default ATen formula."""
    if request.param == "cpu_kernels":
        if not cpu_kernels.kernels_available():
            pytest.skip("fused kernels not built")
        set_backend("cpu_kernels")
    try:
        yield request.param
    finally:
        set_backend("default")


# ----------------------------------------------------------------------------------------------- helpers
def torch_reference(x: torch.Tensor, scale: torch.Tensor | float, dtype: QuantDtype, ch_axis: int | None):
    """torch's own fake quant with zero point 0 and the dtype's integer range."""
    if ch_axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, dtype.qmin, dtype.qmax)
    scale_t = torch.as_tensor(scale, dtype=torch.float32)
    zero_point = torch.zeros(scale_t.numel(), dtype=torch.int32)
    axis = ch_axis % x.dim()
    return torch.fake_quantize_per_channel_affine(x, scale_t, zero_point, axis, dtype.qmin, dtype.qmax)


def scale_view(scale: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if ch_axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return scale.reshape(shape)


def codes_away_from_ties(shape, dtype: QuantDtype, generator: torch.Generator, margin: int = 40):
    """Float64 code-space values ``k + f`` with ``f`` at least 0.05 away from 0 and 0.5 ties.

    ``k`` covers the whole integer range plus ``margin`` codes of clipping on each side; a quarter of the
    values sit within ``margin`` codes of each end of the range (so some are clipped, some are not).
    """
    k = torch.randint(dtype.qmin - margin, dtype.qmax + margin + 1, shape, generator=generator)
    near = torch.randint(-margin, margin + 1, shape, generator=generator)
    region = torch.randint(0, 4, shape, generator=generator)
    k = torch.where(region == 0, dtype.qmax + near, torch.where(region == 1, dtype.qmin + near, k))
    f = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.4 + 0.05  # [0.05, 0.45)
    flip = torch.rand(shape, generator=generator) < 0.5
    f = torch.where(flip, f + 0.5, f)  # [0.55, 0.95)
    return k.double() + f


def inputs_away_from_ties(shape, dtype, scale, ch_axis, generator, margin=40):
    """float32 ``x`` whose ``x / scale`` is far (>= 0.04) from any rounding tie, incl. the two boundaries."""
    codes = codes_away_from_ties(shape, dtype, generator, margin)
    s64 = scale_view(torch.as_tensor(scale, dtype=torch.float32).double(), codes, ch_axis)
    x = (codes * s64).float()
    t = x.double() / s64
    frac = t - t.floor()
    assert bool(((frac - 0.5).abs() > 0.04).all()), "construction must stay away from ties"
    return x


def grad_of(fn, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(leaf), leaf, upstream)
    return grad


# ----------------------------------------------------------------------------------- per tensor vs torch
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.037, 0.1, 1.7, 2.0**-5], ids=lambda s: f"s={s:g}")
def test_per_tensor_forward_matches_torch_away_from_ties(dtype, scale, generator) -> None:
    x = inputs_away_from_ties((7, 33, 5), dtype, scale, None, generator)
    ours = fake_quantize(x, scale, dtype)
    ref = torch_reference(x, scale, dtype, None)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # some values were clipped on both sides, and the range ends are hit exactly
    s32 = torch.tensor(scale, dtype=torch.float32)
    assert bool((ours == dtype.qmax * s32).any()) and bool((ours == dtype.qmin * s32).any())


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("scale", [0.037, 1.7], ids=lambda s: f"s={s:g}")
def test_per_tensor_gradient_matches_torch(dtype, scale, generator) -> None:
    x = inputs_away_from_ties((6, 40), dtype, scale, None, generator)
    upstream = torch.randn(x.shape, generator=generator)
    ours = grad_of(lambda t: fake_quantize(t, scale, dtype), x, upstream)
    ref = grad_of(lambda t: torch_reference(t, scale, dtype, None), x, upstream)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # straight-through inside, zero outside
    t = x.double() / torch.tensor(scale, dtype=torch.float32).double()
    inside = (t > dtype.qmin - 0.5) & (t < dtype.qmax + 0.5)
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(ours, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_gradient_of_sum_uses_expanded_upstream() -> None:
    x = torch.tensor([-200.0, -1.0, 0.2, 3.0, 500.0], requires_grad=True)
    fake_quantize(x, 1.0, qint8).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------- per channel vs torch
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("ch_axis", [0, 1, -1])
def test_per_channel_forward_and_gradient_match_torch(dtype, ch_axis, generator) -> None:
    shape = (5, 4, 6)
    channels = shape[ch_axis]
    scale = torch.rand(channels, generator=generator) * 0.5 + 0.01
    x = inputs_away_from_ties(shape, dtype, scale, ch_axis, generator)
    ours = fake_quantize(x, scale, dtype, ch_axis)
    ref = torch_reference(x, scale, dtype, ch_axis)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)

    upstream = torch.randn(shape, generator=generator)
    g_ours = grad_of(lambda t: fake_quantize(t, scale, dtype, ch_axis), x, upstream)
    g_ref = grad_of(lambda t: torch_reference(t, scale, dtype, ch_axis), x, upstream)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=0)
    assert bool((g_ours == 0).any()) and bool((g_ours != 0).any())


def test_per_channel_uses_each_channels_scale() -> None:
    x = torch.full((2, 3), 1.0)
    scale = torch.tensor([0.3, 1.0, 4.0])
    out = fake_quantize(x, scale, qint8, ch_axis=1)
    # 1/0.3 = 3.33 -> 3 * 0.3; 1/1 -> 1; 1/4 = 0.25 -> 0
    expected = (torch.tensor([3.0, 1.0, 0.0]) * scale).expand(2, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_per_channel_non_contiguous_input(generator) -> None:
    scale = torch.rand(6, generator=generator) * 0.2 + 0.01
    base = inputs_away_from_ties((6, 8, 3), qint8, scale, 0, generator)
    x = base.transpose(0, 1)  # (8, 6, 3), channel axis 1, not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(fake_quantize(x, scale, qint8, 1), torch_reference(x, scale, qint8, 1))
    upstream = torch.randn(x.shape, generator=generator)
    torch.testing.assert_close(
        grad_of(lambda t: fake_quantize(t, scale, qint8, 1), x, upstream),
        grad_of(lambda t: torch_reference(t, scale, qint8, 1), x, upstream),
        rtol=0,
        atol=0,
    )


# ------------------------------------------------------------------------------------------------ ties
def test_exact_ties_round_half_to_even() -> None:
    """x / scale == k + 0.5 exactly (power-of-two scale): the code rounds to the even neighbour."""
    scale = 0.25
    halves = torch.arange(-6, 6, dtype=torch.float32) + 0.5  # -5.5 ... 5.5
    x = halves * scale
    out = fake_quantize(x, scale, qint8)
    expected_codes = [-6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6]  # -5.5 -> -6, -4.5 -> -4, ..., 5.5 -> 6
    assert (out / scale).tolist() == expected_codes
    assert torch.equal(out, torch.round(halves) * scale)  # torch.round is half-to-even too
    # with a power-of-two scale x / s and x * (1 / s) are both exact: torch agrees even on ties
    assert torch.equal(out, torch_reference(x, scale, qint8, None))


def test_ties_are_rounded_as_torch_does() -> None:
    """Like torch, ``x * (1 / s)``: on near-ties of the exact quotient the code follows the product."""
    scale = torch.tensor(0.1, dtype=torch.float32)
    k = torch.arange(-120, 120, dtype=torch.float32)
    x = ((k + 0.5) * scale).float()
    product = x * scale.reciprocal()
    ours = fake_quantize(x, scale, qint8)
    assert torch.equal(ours, torch.round(product) * scale)
    assert torch.equal(ours, torch_reference(x, scale, qint8, None))
    exact = torch.round(x.double() / scale.double())  # the exact quotient: one step away at most
    steps = (ours.double() / scale.double() - exact).abs().round()
    assert set(steps.unique().tolist()) <= {0.0, 1.0}
    near_tie = ((x.double() / scale.double()).frac().abs() - 0.5).abs() < 1e-5
    assert bool((steps[~near_tie] == 0).all())


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_bit_identical_to_torch_on_random_scales_and_ties(dtype, ch_axis, generator) -> None:
    for _ in range(20):
        channels = 1 if ch_axis is None else 8
        scale = torch.rand(channels, generator=generator) * 0.1 + 1e-4
        scale = scale.reshape(()) if ch_axis is None else scale
        codes = torch.randint(dtype.qmin - 20, dtype.qmax + 20, (channels, 300), generator=generator).float()
        codes[:, ::2] += 0.5  # half the values on a tie of the float32 product, up to rounding
        codes[:, 1::4] += torch.rand(codes[:, 1::4].shape, generator=generator) - 0.5
        x = codes * scale.reshape(-1, 1)
        x = x.reshape(-1) if ch_axis is None else x
        upstream = torch.randn(x.shape, generator=generator)
        ours = fake_quantize(x, scale, dtype, ch_axis)
        assert torch.equal(ours, torch_reference(x, scale, dtype, ch_axis))
        assert torch.equal(
            grad_of(lambda t, s=scale: fake_quantize(t, s, dtype, ch_axis), x, upstream),
            grad_of(lambda t, s=scale: torch_reference(t, s, dtype, ch_axis), x, upstream),
        )


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_gradient_on_the_range_boundary_ties(dtype) -> None:
    """x / s == qmin - 0.5 rounds (half to even) to qmin: in range, gradient passes, as in torch."""
    scale = 2.0**-3
    t = torch.tensor(
        [dtype.qmin - 0.5, dtype.qmin - 0.25, dtype.qmin, dtype.qmax, dtype.qmax + 0.25, dtype.qmax + 0.5]
    )
    x = t * scale
    ones = torch.ones_like(x)
    ours = grad_of(lambda v: fake_quantize(v, scale, dtype), x, ones)
    ref = grad_of(lambda v: torch_reference(v, scale, dtype, None), x, ones)
    assert ours.tolist() == ref.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    scale_c = torch.full((t.numel(),), scale)  # per channel the same rule applies
    ours_c = grad_of(lambda v: fake_quantize(v, scale_c, dtype, 0), x, ones)
    assert ours_c.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (-127, 127), (0, 255), (-7, 8)])
def test_gradient_mask_is_the_range_test_for_any_code_range(qmin, qmax) -> None:
    """The mask is ``qmin - 0.5 <= x / s < qmax + 0.5`` (ties included) whatever the parity of the ends;
    a NaN input gets no gradient, and a NaN incoming gradient stays where the mask is set."""
    t = torch.tensor([qmin - 0.75, qmin - 0.5, qmin - 0.25, qmax + 0.25, qmax + 0.5, qmax + 0.75, math.nan])
    x = (t * 0.25).requires_grad_()
    out = quantize_tensor(x, torch.tensor(0.25), qmin, qmax)
    out.backward(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, math.nan, 1.0]))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    codes = (t[:-1] * 0.25 * 4.0).round().clamp(qmin, qmax)  # float64-exact here: s = 1/4
    out = out.detach()
    assert out[:-1].tolist() == (codes * 0.25).tolist() and math.isnan(out[-1])


def test_lower_keep_bound_is_the_float32_below_qmin_minus_half() -> None:
    for qmin in list(range(-300, 300)) + [-32768, -32767, -(2**20)]:
        below = np.nextafter(np.float32(qmin - 0.5), np.float32(-np.inf))
        assert _lower_keep_bound(qmin) == float(below), qmin


@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 255), (1, 7), (-32768, 32767)])
def test_traced_backward_mask_is_the_range_test(qmin, qmax) -> None:
    """The compiled backward's uint8 mask equals ``qmin - 0.5 <= v < qmax + 0.5`` on the edges; NaN: 0."""
    lo, hi = _lower_keep_bound(qmin), qmax + 0.5
    edges = torch.tensor([qmin - 0.5, lo, hi], dtype=torch.float32)
    up, down = torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)
    specials = torch.tensor([0.0, qmin, qmax, 1e30, -1e30, math.inf, -math.inf, math.nan])
    v = torch.cat([edges, up, down, specials])
    want = ((v >= qmin - 0.5) & (v < qmax + 0.5)).to(torch.uint8)
    mask = _keep_mask(v, lo, hi)
    assert mask.dtype == torch.uint8 and mask.tolist() == want.tolist()


def test_traced_qat_node_keeps_a_one_byte_mask_and_gives_the_eager_gradient() -> None:
    """Compiled, a QAT node keeps only a uint8 mask for backward (1 byte per element, not its float32 input
    or a float mask); the gradient is eager's, a NaN input included (0)."""
    node = FakeQuantize("qint8", "minmax")
    set_fake_quantize(node, "calibration")
    node(torch.randn(64, 32))
    set_fake_quantize(node, "qat")
    x = torch.randn(64, 32) * 3
    x[0, :4] = torch.tensor([math.nan, 1e6, -1e6, 0.0])
    eager_node = copy.deepcopy(node)
    traced_x, eager_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert saved_for_backward(lambda t: node(t * 2), traced_x) == [torch.uint8]
    eager_node(eager_x * 2).sum().backward()
    assert torch.equal(traced_x.grad, eager_x.grad) and traced_x.grad[0, :3].tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------- saturation, int16
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_int16_saturates_without_overflow(ch_axis) -> None:
    scale = torch.tensor(1e-3, dtype=torch.float32)
    big = [1e4, 1e6, 1e30, 3.4e38, math.inf]
    x = torch.tensor(big + [-v for v in big], dtype=torch.float32)
    s = scale if ch_axis is None else scale.expand(x.numel()).clone()
    out = fake_quantize(x, s, qint16, ch_axis)
    assert bool(torch.isfinite(out).all())
    top, bottom = 32767 * scale, -32768 * scale
    assert out[:5].tolist() == [float(top)] * 5
    assert out[5:].tolist() == [float(bottom)] * 5
    # all of them are clipped: no gradient
    s4 = s if ch_axis is None else s[:4]
    grad = grad_of(lambda v: fake_quantize(v, s4, qint16, ch_axis), x[:4], torch.ones(4))
    assert grad.tolist() == [0.0] * 4


def test_int16_keeps_what_int8_clips() -> None:
    x = torch.tensor([0.25, 1.0, 2.0, 30.0])
    scale = 2.0**-8
    assert fake_quantize(x, scale, qint16).tolist() == [0.25, 1.0, 2.0, 30.0]
    assert fake_quantize(x, scale, qint8).tolist() == [0.25, 127 * scale, 127 * scale, 127 * scale]


def test_nan_stays_nan() -> None:
    out = fake_quantize(torch.tensor([math.nan, 1.0]), 0.5, qint8)
    assert math.isnan(out[0]) and out[1] == 1.0


# ------------------------------------------------------------------------------------ float16 / float32
def test_float16_is_a_fake_cast_inside_the_range(generator) -> None:
    x = torch.randn(1000, generator=generator) * torch.logspace(-6, 4, 1000)
    out = fake_quantize(x, 123.0, float16)  # the scale is ignored
    assert out.dtype == torch.float32
    assert torch.equal(out, x.half().float())
    assert torch.equal(fake_cast(x), x.half().float())
    assert torch.equal(fake_quantize(x, 1.0, torch.float16), out)
    assert torch.equal(fake_quantize(x, 1.0, "fp16"), out)


def test_float16_saturates_at_fp16_max() -> None:
    assert FP16_MAX == 65504.0
    big = [65504.0, 65519.0, 65520.0, 1e5, 1e30, math.inf]
    x = torch.tensor(big + [-v for v in big])
    assert bool(torch.isinf(x[2:6].half()).all())  # what a plain cast would give
    out = fake_quantize(x, 1.0, float16)
    assert out.tolist() == [65504.0] * 6 + [-65504.0] * 6
    nan_out = fake_cast(torch.tensor([math.nan]))
    assert math.isnan(nan_out[0])


def test_float16_gradient_is_identity(generator) -> None:
    x = torch.tensor([0.1, -3.3, 7e4, -1e6, 1e-8, 65504.0])
    upstream = torch.randn(x.shape, generator=generator)
    assert torch.equal(grad_of(lambda v: fake_quantize(v, 1.0, float16), x, upstream), upstream)
    assert torch.equal(grad_of(fake_cast, x, upstream), upstream)


def test_fake_cast_of_a_half_tensor_is_identity() -> None:
    x = torch.randn(5).half()
    assert fake_cast(x) is x


def test_float32_returns_the_input_object() -> None:
    x = torch.randn(4, requires_grad=True)
    assert fake_quantize(x, 0.1, float32) is x
    assert fake_quantize(x, 0.1, torch.float32) is x
    assert fake_quantize(x, 0.1, "fp32", ch_axis=0) is x


# -------------------------------------------------------------------------------- scale forms and errors
def test_scale_as_float_or_tensor_gives_the_same_result(generator) -> None:
    x = torch.randn(50, generator=generator) * 4
    by_float = fake_quantize(x, 0.05, qint8)
    assert torch.equal(by_float, fake_quantize(x, torch.tensor(0.05), qint8))
    assert torch.equal(by_float, fake_quantize(x, torch.tensor([0.05]), qint8))
    assert torch.equal(by_float, fake_quantize(x, torch.tensor(0.05, dtype=torch.float64), qint8))
    assert torch.equal(by_float, torch_reference(x, 0.05, qint8, None))


def test_default_dtype_is_qint8() -> None:
    x = torch.tensor([1000.0])
    assert fake_quantize(x, 1.0).tolist() == [127.0]


def test_dtype_by_name() -> None:
    x = torch.tensor([1000.0, -1000.0])
    assert fake_quantize(x, 1.0, "qint16").tolist() == [1000.0, -1000.0]
    assert fake_quantize(x, 1.0, "int8").tolist() == [127.0, -128.0]


def test_mismatched_per_channel_scale_raises() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="3 channels along axis 1 .* but there are 4 scales"):
        fake_quantize(x, torch.ones(4), qint8, ch_axis=1)
    with pytest.raises(ValueError, match="per-channel"):
        fake_quantize(x, torch.ones(2), qint8, ch_axis=-1)


@pytest.mark.parametrize("backend", ["default", "cpu_kernels"])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_a_node_refuses_a_tensor_with_another_channel_count(backend, rows) -> None:
    """8 per-channel scales and 1, 4 or 16 rows: no broadcast, no read past the scales (C backend)."""
    if backend == "cpu_kernels" and not cpu_kernels.kernels_available():
        pytest.skip("cpu_kernels not built")
    node = FakeQuantize(qint8, ch_axis=0, num_channels=8)
    set_fake_quantize(node, "calibration")
    node(torch.randn(8, 5))
    set_fake_quantize(node, "validation")
    set_backend(backend)
    try:
        with pytest.raises(ValueError, match=f"{rows} channels along axis 0 .* 8 scales"):
            node(torch.randn(rows, 5))
    finally:
        set_backend("default")


def test_per_tensor_with_several_scales_raises() -> None:
    with pytest.raises(ValueError, match="one scale"):
        fake_quantize(torch.randn(3, 4), torch.ones(4), qint8)


def test_channel_axis_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="out of range"):
        fake_quantize(torch.randn(3, 4), torch.ones(4), qint8, ch_axis=2)


def test_unknown_dtype_raises() -> None:
    with pytest.raises(ValueError, match="qint8"):
        fake_quantize(torch.randn(3), 1.0, "int4")


@pytest.mark.parametrize("scale", [0.0, -0.1, -0.0, math.nan, math.inf, -math.inf, 0, -1, 1e-50, 1e39])
def test_a_python_scale_must_be_finite_and_positive(scale) -> None:
    """1e-50 and 1e39 are positive and finite in Python but 0 and inf as float32 (how it is used)."""
    with pytest.raises(ValueError, match=r"fake_quantize: scale must be a finite number > 0"):
        fake_quantize(torch.tensor([1.0, -0.5, 0.25]), scale, qint8)


@pytest.mark.parametrize("scale", [True, "0.1", None, [0.1]])
def test_a_scale_of_another_type_is_a_type_error(scale) -> None:
    with pytest.raises(TypeError, match="fake_quantize: scale must be"):
        fake_quantize(torch.tensor([1.0]), scale, qint8)


@pytest.mark.parametrize("bad", [0.0, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("ch_axis", [None, 1])
def test_a_cpu_tensor_scale_must_be_finite_and_positive(bad, ch_axis) -> None:
    x = torch.randn(2, 3)
    scale = torch.tensor(bad) if ch_axis is None else torch.tensor([0.1, bad, 0.2])
    with pytest.raises(ValueError, match=r"fake_quantize: scale must be finite and > 0.*got"):
        fake_quantize(x, scale, qint8, ch_axis=ch_axis)
    with pytest.raises(ValueError, match=r"scale must be finite and > 0"):
        fake_quantize(x, scale.requires_grad_(), qint16, ch_axis=ch_axis)  # a learned scale too


def test_positive_scales_of_every_form_are_accepted() -> None:
    x = torch.tensor([1.0, -0.5, 0.25])
    for scale in (0.25, torch.tensor(0.25), torch.tensor([0.25]), torch.tensor(0.25, dtype=torch.float64)):
        assert fake_quantize(x, scale, qint8).tolist() == [1.0, -0.5, 0.25]
    assert fake_quantize(torch.tensor([4.0, -6.0]), 2, qint8).tolist() == [4.0, -6.0]  # an int scale


def test_a_scale_off_the_cpu_is_not_read_back() -> None:
    """Only a CPU tensor scale is checked: reading another device's values would be a host sync."""
    out = fake_quantize(torch.empty(2, 3, device="meta"), torch.zeros((), device="meta"), qint8)
    assert out.device.type == "meta" and out.shape == (2, 3)


def test_the_node_kernel_does_not_check_scale_values() -> None:
    """quantize_tensor is the nodes' hot path: shapes only, never a value read back (no host sync)."""
    out = quantize_tensor(torch.tensor([1.0]), torch.tensor(0.0), qint8.qmin, qint8.qmax)
    assert out.shape == (1,)


@pytest.mark.parametrize("ch_axis", ["1", 1.0, True])
def test_a_channel_axis_that_is_not_an_int_is_a_type_error(ch_axis) -> None:
    with pytest.raises(TypeError, match=r"ch_axis must be an int \(the channel axis\) or None"):
        fake_quantize(torch.randn(2, 3), torch.ones(3), qint8, ch_axis=ch_axis)


def test_x_must_be_a_tensor() -> None:
    with pytest.raises(TypeError, match="fake_quantize: x must be a tensor"):
        fake_quantize([1.0, 2.0], 0.1, qint8)


# ------------------------------------------------------------------------------------ property tests
@st.composite
def fq_cases(draw):
    dtype = draw(st.sampled_from(INT_DTYPES))
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    ch_axis = draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1)))
    n_scales = 1 if ch_axis is None else shape[ch_axis]
    scale_strategy = st.one_of(
        st.sampled_from([2.0**-10, 2.0**-3, 0.5, 1.0, 4.0]),
        st.floats(2.0**-13, 1024.0, allow_nan=False, allow_infinity=False, width=32),
    )
    scales = draw(st.lists(scale_strategy, min_size=n_scales, max_size=n_scales))
    margin = 64
    codes = draw(
        hnp.arrays(
            np.float64,
            shape,
            elements=st.floats(dtype.qmin - margin, dtype.qmax + margin, allow_nan=False),
        )
    )
    return dtype, shape, ch_axis, scales, codes


def _ulp32(value: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 numbers around ``value`` (float64 tensor)."""
    exponent = torch.floor(torch.log2(value.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 23)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fq_cases())
def test_property_matches_float64_recomputation(case) -> None:
    dtype, shape, ch_axis, scales, codes = case
    scale = torch.tensor(scales, dtype=torch.float32)
    if ch_axis is None:
        scale = scale.reshape(())
    codes64 = torch.from_numpy(codes)
    s64 = scale_view(scale.double(), codes64, ch_axis)
    x = (codes64 * s64).float()
    x.requires_grad_(True)

    out = fake_quantize(x, scale, dtype, ch_axis)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))

    t = x.detach().double() / s64  # exact quotient (up to float64 rounding)
    ref = (torch.round(t).clamp(dtype.qmin, dtype.qmax) * s64).float()
    near_tie = ((t - t.floor()) - 0.5).abs() <= 2 * _ulp32(t)
    equal = out.detach() == ref
    assert bool((equal | near_tie).all()), "forward differs from clamp(round(x / s)) * s away from a tie"
    step = s64.expand_as(t) + 2 * _ulp32(ref.double())  # one code, plus the rounding of the two products
    one_step = (out.detach().double() - ref.double()).abs() <= step
    assert bool(one_step.all()), "forward differs by more than one step on a tie"

    lo, hi = dtype.qmin - 0.5, dtype.qmax + 0.5
    expected_mask = (t > lo) & (t < hi)
    tol_lo, tol_hi = 4 * _ulp32(torch.tensor(lo)), 4 * _ulp32(torch.tensor(hi))
    near_bound = ((t - lo).abs() <= tol_lo) | ((t - hi).abs() <= tol_hi)
    assert bool(((grad == expected_mask.float()) | near_bound).all()), "gradient mask differs"
    assert set(grad.unique().tolist()) <= {0.0, 1.0}


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(INT_DTYPES),
    scale=st.floats(2.0**-10, 128.0, width=32),
    seed=st.integers(0, 2**16),
    per_channel=st.booleans(),
)
def test_property_matches_torch_away_from_ties(dtype, scale, seed, per_channel) -> None:
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 4, 5)
    ch_axis = 1 if per_channel else None
    s = torch.full((4,), scale) * (torch.arange(4) + 1) if per_channel else torch.tensor(scale)
    x = inputs_away_from_ties(shape, dtype, s, ch_axis, generator, margin=8)
    assert torch.equal(fake_quantize(x, s, dtype, ch_axis), torch_reference(x, s, dtype, ch_axis))
    upstream = torch.randn(shape, generator=generator)
    assert torch.equal(
        grad_of(lambda v: fake_quantize(v, s, dtype, ch_axis), x, upstream),
        grad_of(lambda v: torch_reference(v, s, dtype, ch_axis), x, upstream),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_half_input_is_kept_in_its_own_dtype_for_backward(dtype, ch_axis) -> None:
    """A half-precision input is saved as is (2 bytes), values and gradients equal the float32 path's."""
    x = (torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).requires_grad_()
    scale = torch.tensor(0.02) if ch_axis is None else torch.tensor([0.02, 0.01, 0.03, 0.005])
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = quantize_tensor(x, scale, -128, 127, ch_axis)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad)
    assert saved.count(dtype) == 1  # the input itself, not a float32 copy of it
    assert all(d in (dtype, torch.float32) for d in saved)
    ref_x = x.detach().float().requires_grad_()
    ref = quantize_tensor(ref_x, scale, -128, 127, ch_axis)
    ref.backward(grad.float())
    assert out.dtype == dtype and torch.equal(out, ref.to(dtype))
    assert x.grad.dtype == dtype and torch.equal(x.grad, ref_x.grad.to(dtype))
