"""quant.nodes.fake_quantize: FakeQuantize states, switches, dtype changes and state round-trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.dtypes import float16, float32, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import (
    FakeCast,
    FakeQuantize,
    FakeQuantState,
    fake_quant_disabled,
    fake_quant_state,
    iter_fake_quantize,
    set_fake_quantize,
)
from qat_lightning.quant.nodes.functional import fake_quantize
from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch
from qat_lightning.quant.observers import DEFAULT_SCALE, OBSERVER_NAMES

DATA_OBSERVERS = [name for name in OBSERVER_NAMES if name != "fixed"]
STATE_NAMES = ["QAT", "CALIBRATION", "VALIDATION", "FLOAT"]


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def calibrated(x: torch.Tensor, dtype=qint8, observer: str = "minmax", **kwargs) -> FakeQuantize:
    fq = FakeQuantize(dtype, observer, **kwargs)
    set_fake_quantize(fq, FakeQuantState.CALIBRATION)
    fq(x)
    return fq


def buffers_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_buffers(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- CALIBRATION
def test_calibration_passes_values_through_and_observes(generator) -> None:
    fq = FakeQuantize(qint8, "minmax")
    set_fake_quantize(fq, FakeQuantState.CALIBRATION)
    x1 = torch.randn(4, 8, generator=generator)
    x2 = torch.randn(4, 8, generator=generator) * 3
    assert fq(x1) is x1
    assert fq(x2) is x2
    assert fq.observer.has_data
    amax = max(float(x1.abs().max()), float(x2.abs().max()))
    assert torch.equal(fq.scale, f32(amax / 127))
    assert torch.equal(fq.scale, fq.observer.compute_scale(qint8))


@pytest.mark.parametrize("observer", DATA_OBSERVERS)
def test_calibrated_scale_is_the_observers_scale(observer, generator) -> None:
    x = torch.randn(64, 32, generator=generator)
    fq = calibrated(x, qint8, observer)
    assert fq.scale.shape == ()
    assert torch.equal(fq.scale, fq.observer.compute_scale(qint8))
    assert 0 < float(fq.scale) <= float(x.abs().max()) / 127 * (1 + 1e-6)


def test_calibration_does_not_quantize_and_keeps_gradient(generator) -> None:
    fq = FakeQuantize(qint8, "minmax")
    set_fake_quantize(fq, "calibration")
    x = torch.randn(10, generator=generator, requires_grad=True)
    y = fq(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def test_calibration_of_a_float_node_still_collects_statistics(generator) -> None:
    x = torch.randn(16, generator=generator)
    for dtype in (float16, float32):
        fq = calibrated(x, dtype)
        assert fq.observer.has_data
        fq.dtype = qint8
        assert torch.equal(fq.scale, f32(float(x.abs().max()) / 127))


# -------------------------------------------------------------------------------------------- VALIDATION
def test_validation_quantizes_with_the_frozen_scale(generator) -> None:
    x = torch.randn(32, generator=generator)
    fq = calibrated(x)
    scale = fq.scale.clone()
    before = buffers_of(fq)
    set_fake_quantize(fq, FakeQuantState.VALIDATION)
    wider = torch.randn(32, generator=generator) * 10
    out = fq(wider)
    assert torch.equal(out, fake_quantize(wider, scale, qint8))
    assert torch.equal(fq.scale, scale)
    assert_same_buffers(buffers_of(fq), before)  # statistics untouched
    assert float(out.abs().max()) <= float(scale) * 128


def test_validation_without_data_uses_the_default_scale(generator) -> None:
    fq = FakeQuantize(qint8, "mse", name="head.out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a node that never runs does not warn
        set_fake_quantize(fq, "validation")
    x = torch.randn(20, generator=generator) * 300
    with pytest.warns(RuntimeWarning, match="head.out"):  # eager: once, at the first forward
        out = fq(x)
    assert DEFAULT_SCALE == 1.0
    assert torch.equal(fq.scale, f32(DEFAULT_SCALE))
    assert torch.equal(out, fake_quantize(x, DEFAULT_SCALE, qint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warns once per node, not per batch
        assert torch.equal(fq(x), out)


def test_validation_without_data_per_channel(generator) -> None:
    fq = FakeQuantize(qint16, "minmax", ch_axis=0, num_channels=3)
    set_fake_quantize(fq, "validation")
    w = torch.randn(3, 5, generator=generator) * 1e5
    with pytest.warns(RuntimeWarning):
        out = fq(w)
    assert torch.equal(fq.scale, torch.full((3,), DEFAULT_SCALE))
    assert torch.equal(out, fake_quantize(w, torch.ones(3), qint16, 0))


# --------------------------------------------------------------------------------------------------- QAT
def test_qat_moving_average_of_the_scale(generator) -> None:
    c = 0.25
    x0 = torch.randn(50, generator=generator)
    fq = calibrated(x0, qat_averaging_constant=c)
    s = float(x0.abs().max()) / 127  # calibrated
    seen_max = float(x0.max())
    set_fake_quantize(fq, FakeQuantState.QAT)
    for k in range(4):
        x = torch.randn(50, generator=generator) * (k + 2)
        before = fq.scale.clone()
        out = fq(x)
        # documented: quantized with the scale as it stands, then scale += c * (amax / qmax - scale)
        assert torch.equal(out, fake_quantize(x, before, qint8))
        s = s + c * (float(x.abs().max()) / 127 - s)
        assert float(fq.scale) == pytest.approx(s, rel=1e-6)
        seen_max = max(seen_max, float(x.max()))
        assert float(fq.observer.max_val) == seen_max  # the statistics saw the batch too


def test_qat_without_averaging_quantizes_with_the_batch_max(generator) -> None:
    fq = calibrated(torch.randn(50, generator=generator), qat_averaging_constant=1.0)
    set_fake_quantize(fq, FakeQuantState.QAT)
    x = torch.randn(50, generator=generator) * 7
    out = fq(x)  # c = 1: the scale is this batch's own max, taken before quantizing
    assert float(fq.scale) == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    assert torch.equal(out, fake_quantize(x, fq.scale, qint8))


def test_qat_with_nonfinite_values(generator) -> None:
    fq = calibrated(torch.randn(64, generator=generator), ignore_nonfinite=True)
    set_fake_quantize(fq, FakeQuantState.QAT)
    x = torch.randn(64, generator=generator)
    before = fq.scale.clone()
    x[3] = float("nan")
    x[9] = float("inf")
    out = fq(x)
    finite = torch.cat([x[:3], x[4:9], x[10:]])
    expected = before + 0.01 * (finite.abs().max() / 127 - before)
    torch.testing.assert_close(fq.scale, expected, rtol=1e-6, atol=0)
    assert torch.equal(out[:3], fake_quantize(x[:3], before, qint8))
    strict = calibrated(torch.randn(64, generator=generator))
    set_fake_quantize(strict, FakeQuantState.QAT)
    scale = strict.scale.clone()
    strict(x)  # no host sync in the forward: the batch leaves the scale alone and is counted
    assert torch.equal(strict.scale, scale)
    with pytest.raises(ValueError, match="NaN|inf|non-finite"):
        set_fake_quantize(strict, FakeQuantState.VALIDATION)  # the next state change raises


def test_qat_without_calibration_starts_from_the_first_batch(generator) -> None:
    fq = FakeQuantize(qint16, "minmax", qat_averaging_constant=0.5)
    x1 = torch.randn(30, generator=generator)
    fq(x1)  # default state is QAT
    s1 = float(x1.abs().max()) / 32767
    assert float(fq.scale) == pytest.approx(s1, rel=1e-6)
    x2 = torch.randn(30, generator=generator) * 4
    fq(x2)
    assert float(fq.scale) == pytest.approx(s1 + 0.5 * (float(x2.abs().max()) / 32767 - s1), rel=1e-6)


def test_qat_gradient_is_straight_through(generator) -> None:
    fq = calibrated(torch.linspace(-1, 1, 11))  # scale 1/127
    set_fake_quantize(fq, "qat")
    fq.fix_scale()
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.99, 2.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    fq(x).backward(upstream)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


def test_qat_weight_scales_follow_the_per_channel_abs_max(generator) -> None:
    channels = 4
    fq = FakeQuantize(qint8, "minmax", ch_axis=0, num_channels=channels)
    set_fake_quantize(fq, FakeQuantState.QAT)
    w = torch.randn(channels, 3, 2, 2, generator=generator)
    out = fq(w)
    expected = (w.abs().amax(dim=(1, 2, 3)).double() / 127).float()
    torch.testing.assert_close(fq.scale, expected, rtol=1e-6, atol=0)
    assert torch.equal(out, fake_quantize(w, fq.scale, qint8, 0))
    # weights shrink: the scale follows the current weights (no running max, no averaging)
    w2 = w * torch.tensor([0.5, 1.0, 2.0, 0.1]).view(-1, 1, 1, 1)
    fq(w2)
    torch.testing.assert_close(fq.scale, w2.abs().amax(dim=(1, 2, 3)) / 127, rtol=1e-6, atol=0)


def test_qat_weight_gradient_is_straight_through(generator) -> None:
    fq = FakeQuantize(qint8, "minmax", ch_axis=0, num_channels=3)
    w = torch.randn(3, 7, generator=generator, requires_grad=True)
    fq(w).sum().backward()
    assert torch.equal(w.grad, torch.ones(3, 7))  # the max sets the scale: nothing is clipped


# ------------------------------------------------------------------------------------------------- FLOAT
def test_float_state_is_identity(generator) -> None:
    fq = FakeQuantize(qint8, "minmax")
    set_fake_quantize(fq, FakeQuantState.FLOAT)
    x = torch.randn(5, generator=generator)
    assert fq(x) is x
    assert not fq.observer.has_data
    assert torch.equal(fq.scale, f32(1.0))


# ------------------------------------------------------------------------------------ set_fake_quantize
def small_model() -> nn.Sequential:
    return nn.Sequential(
        FakeQuantize(qint8, "minmax"),
        nn.Linear(4, 4),
        FakeQuantize(qint8, "minmax"),
        nn.ReLU(),
        nn.Sequential(FakeQuantize(qint16, "minmax"), nn.Linear(4, 2), FakeQuantize(qint8, "minmax")),
    )


def states(model: nn.Module) -> list[FakeQuantState]:
    return [node.state for _, node in iter_fake_quantize(model)]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (FakeQuantState.CALIBRATION, FakeQuantState.CALIBRATION),
        ("calibration", FakeQuantState.CALIBRATION),
        ("CALIBRATION", FakeQuantState.CALIBRATION),
        ("Validation", FakeQuantState.VALIDATION),
        ("qat", FakeQuantState.QAT),
        ("float", FakeQuantState.FLOAT),
        (" FLOAT ", FakeQuantState.FLOAT),
    ],
)
def test_set_fake_quantize_sets_every_node(given, expected) -> None:
    model = small_model()
    assert len(states(model)) == 4
    set_fake_quantize(model, given)
    assert states(model) == [expected] * 4


def test_set_fake_quantize_unknown_state_lists_states_and_changes_nothing() -> None:
    model = small_model()
    set_fake_quantize(model, "validation")
    with pytest.raises(ValueError) as info:
        set_fake_quantize(model, "training")
    for name in STATE_NAMES:
        assert name in str(info.value)
    assert "training" in str(info.value)
    assert states(model) == [FakeQuantState.VALIDATION] * 4
    with pytest.raises(ValueError):
        set_fake_quantize(model, 3)  # type: ignore[arg-type]


def test_public_names_point_to_the_same_objects() -> None:
    assert ql.set_fake_quantize is set_fake_quantize
    assert ql.FakeQuantState is FakeQuantState
    assert ql.FakeQuantize is FakeQuantize
    assert ql.fake_quant_disabled is fake_quant_disabled
    assert ql.GlobalFakeQuantSwitch is GlobalFakeQuantSwitch
    assert ql.FakeCast is FakeCast


def test_calibrate_then_validate_a_model(generator) -> None:
    model = small_model()
    x = torch.randn(8, 4, generator=generator)
    set_fake_quantize(model, "calibration")
    with torch.no_grad():
        float_out = model(x)
    for _, node in iter_fake_quantize(model):
        assert node.observer.has_data
    set_fake_quantize(model, "validation")
    with torch.no_grad():
        quant_out = model(x)
    assert not torch.equal(quant_out, float_out)
    torch.testing.assert_close(quant_out, float_out, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------- fake_quant_disabled
def mixed_states(model: nn.Module) -> list[FakeQuantState]:
    mixed = [FakeQuantState.QAT, FakeQuantState.CALIBRATION, FakeQuantState.VALIDATION, FakeQuantState.FLOAT]
    for (_, node), state in zip(iter_fake_quantize(model), mixed, strict=True):
        node.state = state
    return mixed


def test_fake_quant_disabled_restores_each_nodes_state(generator) -> None:
    model = small_model()
    previous = mixed_states(model)
    x = torch.randn(3, 4, generator=generator)
    with fake_quant_disabled(model) as inner:
        assert inner is model
        assert states(model) == [FakeQuantState.FLOAT] * 4
        out = model(x)
    plain = nn.Sequential(model[1], model[3], model[4][1])
    assert torch.equal(out, plain(x))
    assert states(model) == previous
    for _, node in iter_fake_quantize(model):
        assert not node.observer.has_data  # FLOAT observed nothing


def test_fake_quant_disabled_restores_when_the_body_raises() -> None:
    model = small_model()
    previous = mixed_states(model)
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quant_disabled(model):
            raise RuntimeError("boom")
    assert states(model) == previous


def test_fake_quant_disabled_on_a_submodule_only() -> None:
    model = small_model()
    set_fake_quantize(model, "qat")
    with fake_quant_disabled(model[4]):
        assert states(model) == [FakeQuantState.QAT] * 2 + [FakeQuantState.FLOAT] * 2
    assert states(model) == [FakeQuantState.QAT] * 4


def test_fake_quant_state_context() -> None:
    model = small_model()
    previous = mixed_states(model)
    with fake_quant_state(model, "calibration"):
        assert states(model) == [FakeQuantState.CALIBRATION] * 4
    assert states(model) == previous
    with pytest.raises(ValueError):
        with fake_quant_state(model, "nope"):
            pass
    assert states(model) == previous


# ------------------------------------------------------------------------------------ global switches
class PartlyQuantized(nn.Module):
    """Seed idiom: switch fake quant off between two nodes inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = FakeQuantize(qint8, "fixed", observer_kwargs={"threshold": 1.27})  # scale 0.01
        self.b = FakeQuantize(qint8, "fixed", observer_kwargs={"threshold": 12.7})  # scale 0.1
        self.c = FakeQuantize(qint8, "minmax")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        GlobalFakeQuantSwitch.disable()
        y = self.b(x * 3) + self.c(x)
        GlobalFakeQuantSwitch.enable()
        return self.b(y)


def test_global_switch_inside_forward() -> None:
    model = PartlyQuantized()
    x = torch.tensor([0.123, -0.456, 2.0])
    set_fake_quantize(model, "calibration")
    model(x)
    assert not model.c.observer.has_data  # ran while the switch was off
    assert GlobalFakeQuantSwitch.enabled()
    set_fake_quantize(model, "validation")
    out = model(x)
    xa = fake_quantize(x, 0.01, qint8)
    expected = fake_quantize(xa * 3 + xa, 0.1, qint8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_global_switch_disabled_context_restores() -> None:
    fq = FakeQuantize(qint8, "fixed", observer_kwargs={"threshold": 1.0})
    x = torch.tensor([0.33333, 5.0])
    with GlobalFakeQuantSwitch.disabled():
        assert not GlobalFakeQuantSwitch.enabled()
        assert fq(x) is x
    assert GlobalFakeQuantSwitch.enabled()
    assert not torch.equal(fq(x), x)
    GlobalFakeQuantSwitch.disable()
    with GlobalFakeQuantSwitch.disabled():
        pass
    assert not GlobalFakeQuantSwitch.enabled()  # previous value (off) restored


class HalfThenFloat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h1 = FakeQuantize(float16, "minmax")
        self.h2 = FakeQuantize(float16, "minmax")
        self.cast = FakeCast()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.h1(x)
        b = self.cast(x)
        FakeCast.disable()
        c = self.h2(x)
        d = self.cast(x)
        FakeCast.enable()
        return a, b, c, d


@pytest.mark.parametrize("state", ["qat", "validation"])
def test_fake_cast_switch_inside_forward(state) -> None:
    model = HalfThenFloat()
    set_fake_quantize(model, state)
    x = torch.tensor([0.1, 1.0 / 3.0, 1e5, 12345.678])
    a, b, c, d = model(x)
    assert torch.equal(a, x.half().float().clamp(-65504, 65504))
    assert torch.equal(b, a)
    assert c is x and d is x
    assert FakeCast.enabled() and FakeCastSwitch.enabled()


def test_fake_cast_off_does_not_touch_integer_nodes() -> None:
    fq = FakeQuantize(qint8, "fixed", observer_kwargs={"threshold": 1.27})
    x = torch.tensor([0.123])
    FakeCast.disable()
    assert torch.equal(fq(x), fake_quantize(x, 0.01, qint8))


def test_switch_leak_1_left_disabled_on_purpose() -> None:
    GlobalFakeQuantSwitch.disable()
    FakeCast.disable()
    assert not GlobalFakeQuantSwitch.enabled() and not FakeCast.enabled()


def test_switch_leak_2_restored_by_the_autouse_fixture() -> None:
    assert GlobalFakeQuantSwitch.enabled() and FakeCast.enabled()


# ------------------------------------------------------------------------------------------ dtype change
@pytest.mark.parametrize("observer", ["minmax", "moving_minmax", "percentile", "kl", "mse", "mix"])
def test_dtype_switch_recomputes_from_kept_statistics(observer, generator) -> None:
    x = torch.randn(256, generator=generator) * 2
    fq = calibrated(x, qint8, observer)
    s8 = fq.scale.clone()
    assert torch.equal(s8, fq.observer.compute_scale(qint8))
    before = {k: v for k, v in buffers_of(fq.observer).items()}
    fq.dtype = ql.qint16
    assert fq.dtype is qint16
    assert int(fq.dtype_code) == qint16.code
    assert torch.equal(fq.scale, fq.observer.compute_scale(qint16))
    assert_same_buffers(buffers_of(fq.observer), before)  # no new data needed or used
    fq.dtype = "qint8"
    assert torch.equal(fq.scale, s8)


def test_dtype_switch_minmax_by_hand(generator) -> None:
    x = torch.randn(100, generator=generator)
    fq = calibrated(x)
    fq.dtype = qint16
    assert torch.equal(fq.scale, f32(float(x.abs().max()) / 32767))
    set_fake_quantize(fq, "validation")
    assert torch.equal(fq(x), fake_quantize(x, f32(float(x.abs().max()) / 32767), qint16))


def test_dtype_switch_per_channel(generator) -> None:
    w = torch.randn(5, 6, generator=generator)
    fq = FakeQuantize(qint8, "minmax", ch_axis=0, num_channels=5)
    set_fake_quantize(fq, "calibration")
    fq(w)
    fq.dtype = qint16
    expected = (w.abs().amax(dim=1).double() / 32767).float()
    assert torch.equal(fq.scale, expected)


def test_dtype_switch_to_float16_and_back(generator) -> None:
    x = torch.randn(40, generator=generator)
    fq = calibrated(x)
    s8 = fq.scale.clone()
    fq.dtype = float16
    set_fake_quantize(fq, "validation")
    assert torch.equal(fq(x), x.half().float())
    fq.dtype = torch.float32
    assert fq(x) is x
    fq.dtype = qint8
    assert torch.equal(fq.scale, s8)
    assert torch.equal(fq(x), fake_quantize(x, s8, qint8))


# --------------------------------------------------------------------------------------------- fixed
def test_fixed_scale_int8_int16_and_unmoved_by_data(generator) -> None:
    fq = FakeQuantize(qint8, observer="fixed", observer_kwargs={"threshold": 200.0})
    assert fq.is_fixed
    assert torch.equal(fq.scale, f32(200.0 / 127))
    set_fake_quantize(fq, "calibration")
    fq(torch.randn(100, generator=generator) * 1000)
    assert torch.equal(fq.scale, f32(200.0 / 127))
    set_fake_quantize(fq, "qat")
    x = torch.randn(100, generator=generator) * 1000
    out = fq(x)
    assert torch.equal(fq.scale, f32(200.0 / 127))
    assert torch.equal(out, fake_quantize(x, f32(200.0 / 127), qint8))
    assert float(out.max()) == pytest.approx(200.0, rel=1e-6)
    fq.dtype = qint16
    assert torch.equal(fq.scale, f32(200.0 / 32767))
    fq(x)
    assert torch.equal(fq.scale, f32(200.0 / 32767))
    fq.dtype = qint8
    assert torch.equal(fq.scale, f32(200.0 / 127))


def test_fixed_scale_created_as_int16() -> None:
    fq = FakeQuantize(qint16, observer="fixed", observer_kwargs={"threshold": 200.0})
    set_fake_quantize(fq, "validation")
    out = fq(torch.tensor([250.0, 100.0]))
    assert torch.equal(fq.scale, f32(200.0 / 32767))
    assert torch.equal(out, fake_quantize(torch.tensor([250.0, 100.0]), f32(200.0 / 32767), qint16))


def test_fix_scale_pins_through_qat(generator) -> None:
    x = torch.randn(64, generator=generator)
    fq = calibrated(x, qat_averaging_constant=1.0)
    s = fq.scale.clone()
    fq.fix_scale()
    assert fq.is_fixed and bool(fq.scale_fixed)
    set_fake_quantize(fq, "qat")
    big = torch.randn(64, generator=generator) * 50
    out = fq(big)
    assert torch.equal(fq.scale, s)
    assert torch.equal(out, fake_quantize(big, s, qint8))
    set_fake_quantize(fq, "calibration")
    fq(big)
    assert torch.equal(fq.scale, s)
    fq.fix_scale(False)
    assert not fq.is_fixed
    set_fake_quantize(fq, "qat")
    fq(big)
    assert float(fq.scale) == pytest.approx(float(big.abs().max()) / 127, rel=1e-6)


def _moved_by_qat(generator: torch.Generator) -> FakeQuantize:
    """A calibrated node whose scale QAT moved away from the one its statistics give."""
    fq = calibrated(torch.randn(100, generator=generator) * 2)
    set_fake_quantize(fq, "qat")
    for _ in range(50):
        fq(torch.randn(100, generator=generator) * 0.5)
    assert float(fq.scale) < 0.9 * float(fq.observer.compute_scale(qint8))
    return fq


def test_a_pinned_scale_survives_a_calibration_pass(generator) -> None:
    """``fix_scale``: calibration leaves the scale as it is, on entering, observing and leaving."""
    fq = _moved_by_qat(generator)
    fq.fix_scale()
    pinned, batches = fq.scale.clone(), int(fq.observer.num_batches)
    set_fake_quantize(fq, "calibration")
    fq(torch.randn(100, generator=generator) * 5)
    assert torch.equal(fq.scale, pinned)
    set_fake_quantize(fq, "validation")
    assert torch.equal(fq.scale, pinned) and int(fq.observer.num_batches) == batches


def test_calibration_state_without_a_batch_changes_no_scale(generator) -> None:
    """Entering and leaving ``CALIBRATION`` with no data keeps a QAT-moved scale; new data moves it."""
    fq = _moved_by_qat(generator)
    moved = fq.scale.clone()
    with fake_quant_state(fq, "calibration"):
        pass
    assert torch.equal(fq.scale, moved) and fq.state is FakeQuantState.QAT
    with fake_quant_state(fq, "calibration"):
        fq(torch.randn(100, generator=generator))
    assert torch.equal(fq.scale, fq.observer.compute_scale(qint8))


def test_a_pinned_scale_takes_the_statistics_scale_of_a_new_dtype(generator) -> None:
    """int8 -> int16 on a pinned node gives the scale a calibration in int16 gives (what a search probe of
    the node and a model re-prepared with the search's setter both use), and the node stays pinned."""
    fq = _moved_by_qat(generator)
    fq.fix_scale()
    fq.dtype = qint16
    assert torch.equal(fq.scale, fq.observer.compute_scale(qint16)) and fq.is_fixed


def test_reset_statistics_then_as_many_batches_recomputes_the_scale(generator) -> None:
    """A compiled calibration forward sets no flag; a reset + the same batch count must still count as new.

    The observer is called directly, as the compiled forward does (statistics only, no host-side flag).
    """
    fq = calibrated(torch.randn(100, generator=generator))
    old = fq.scale.clone()
    set_fake_quantize(fq, "calibration")
    fq.observer.reset_statistics()
    fq.observer(torch.randn(100, generator=generator) * 10)  # one batch, as in the first calibration
    set_fake_quantize(fq, "validation")
    assert int(fq.observer.num_batches) == 1
    assert not torch.equal(fq.scale, old)
    assert torch.equal(fq.scale, fq.observer.compute_scale(qint8))


# -------------------------------------------------------------------------------------- state round-trip
def node_args(per_channel: bool, observer: str) -> dict:
    if per_channel:
        return {"observer": observer, "ch_axis": 0, "num_channels": 6}
    return {"observer": observer}


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("observer", ["minmax", "kl"])
@pytest.mark.parametrize("switch_to_int16", [False, True], ids=["int8", "int8->int16"])
def test_state_dict_round_trip(per_channel, observer, switch_to_int16, generator) -> None:
    args = node_args(per_channel, observer)
    src = FakeQuantize(qint8, **args)
    set_fake_quantize(src, "calibration")
    for _ in range(3):
        src(torch.randn(6, 20, generator=generator))
    if switch_to_int16:
        src.dtype = qint16
    state = src.state_dict()
    assert "scale" in state and "dtype_code" in state

    dst = FakeQuantize(qint8, **args)
    dst.load_state_dict(state)
    assert dst.dtype is src.dtype
    assert dst.dtype is (qint16 if switch_to_int16 else qint8)
    assert torch.equal(dst.scale, src.scale)
    assert torch.equal(dst.scale, src.observer.compute_scale(src.dtype))
    assert dst.is_fixed == src.is_fixed
    x = torch.randn(6, 20, generator=generator) * 2
    for state_name in ("validation", "qat"):
        set_fake_quantize(src, state_name)
        set_fake_quantize(dst, state_name)
        assert torch.equal(dst(x), src(x))
        assert torch.equal(dst.scale, src.scale)


def test_state_dict_round_trip_of_pinned_and_fixed_nodes(generator) -> None:
    pinned = calibrated(torch.randn(10, generator=generator))
    pinned.fix_scale()
    dst = FakeQuantize(qint8, "minmax")
    dst.load_state_dict(pinned.state_dict())
    assert dst.is_fixed
    set_fake_quantize(dst, "qat")
    dst(torch.randn(10, generator=generator) * 100)
    assert torch.equal(dst.scale, pinned.scale)

    fixed = FakeQuantize(qint8, "fixed", observer_kwargs={"threshold": 200.0})
    fixed.dtype = qint16
    other = FakeQuantize(qint8, "fixed", observer_kwargs={"threshold": 200.0})
    other.load_state_dict(fixed.state_dict())
    assert other.dtype is qint16 and torch.equal(other.scale, f32(200.0 / 32767))


def test_state_dict_round_trip_inside_a_model(generator) -> None:
    model = small_model()
    set_fake_quantize(model, "calibration")
    model(torch.randn(5, 4, generator=generator))
    model[2].dtype = qint16
    copy_model = small_model()
    copy_model.load_state_dict(model.state_dict())
    assert copy_model[2].dtype is qint16
    set_fake_quantize(model, "validation")
    set_fake_quantize(copy_model, "validation")
    x = torch.randn(5, 4, generator=generator)
    assert torch.equal(copy_model(x), model(x))


def test_deepcopy_is_independent(generator) -> None:
    x = torch.randn(30, generator=generator)
    original = calibrated(x)
    saved = buffers_of(original)
    clone = copy.deepcopy(original)
    assert torch.equal(clone.scale, original.scale)
    clone(torch.randn(30, generator=generator) * 100)  # still CALIBRATION
    assert not torch.equal(clone.scale, original.scale)
    assert_same_buffers(buffers_of(original), saved)
    clone.dtype = qint16
    assert original.dtype is qint8
    set_fake_quantize(clone, "float")
    assert original.state is FakeQuantState.CALIBRATION


def test_per_channel_buffer_shapes_are_fixed_at_construction(generator) -> None:
    fq = FakeQuantize(qint8, "kl", ch_axis=1, num_channels=3)
    shapes = {k: tuple(v.shape) for k, v in fq.state_dict().items()}
    assert shapes["scale"] == (3,)
    assert shapes["observer.min_val"] == (3,)
    set_fake_quantize(fq, "calibration")
    fq(torch.randn(4, 3, 5, generator=generator))
    fq.dtype = qint16
    assert {k: tuple(v.shape) for k, v in fq.state_dict().items()} == shapes
    other = FakeQuantize(qint8, "kl", ch_axis=1, num_channels=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(fq.state_dict())
    per_tensor = FakeQuantize(qint8, "minmax")
    assert per_tensor.scale.shape == ()


def test_per_channel_node_rejects_a_wrong_channel_count(generator) -> None:
    fq = FakeQuantize(qint8, "minmax", ch_axis=0, num_channels=3)
    set_fake_quantize(fq, "calibration")
    with pytest.raises(ValueError, match="3 channels"):
        fq(torch.randn(4, 2, generator=generator))


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_qat_averaging_constant(bad) -> None:
    with pytest.raises(ValueError, match="qat_averaging_constant"):
        FakeQuantize(qint8, "minmax", qat_averaging_constant=bad)


def test_valid_qat_averaging_constant_edge() -> None:
    FakeQuantize(qint8, "minmax", qat_averaging_constant=1.0)


def test_unknown_observer_lists_names() -> None:
    with pytest.raises(ValueError) as info:
        FakeQuantize(qint8, "entropy")
    for name in OBSERVER_NAMES:
        assert name in str(info.value)


def test_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="qint16"):
        FakeQuantize("int4", "minmax")


def test_state_parse() -> None:
    assert FakeQuantState.parse("_qat") is FakeQuantState.QAT
    assert FakeQuantState.parse(FakeQuantState.FLOAT) is FakeQuantState.FLOAT
    with pytest.raises(ValueError, match="QAT, CALIBRATION, VALIDATION, FLOAT"):
        FakeQuantState.parse("train")


def test_extra_repr_mentions_dtype_observer_and_state() -> None:
    text = repr(FakeQuantize(qint16, "mse", ch_axis=0, num_channels=2))
    assert "qint16" in text and "mse" in text and "ch_axis=0" in text and "QAT" in text


def test_qat_after_loading_a_scale_quantizes_with_it_then_moves_it() -> None:
    """A node whose scale came from a checkpoint quantizes the first QAT batch with that scale."""
    src = FakeQuantize()
    src.state = "calibration"
    src(torch.linspace(-1.0, 1.0, 101))
    src.state = "qat"
    dst = FakeQuantize()
    dst.load_state_dict(src.state_dict())
    dst.state = "qat"
    loaded = dst.scale.clone()
    x = torch.linspace(-8.0, 8.0, 101)
    assert torch.equal(dst(x), ql.fake_quantize(x, loaded, "qint8"))  # not the batch's own scale
    want = loaded + 0.01 * (torch.tensor(8.0) / 127 - loaded)
    torch.testing.assert_close(dst.scale, want, rtol=1e-6, atol=0)
