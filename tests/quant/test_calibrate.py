"""Plain-torch calibration: ql.calibrate, the calibrated flag, one error for uncalibrated models, drift."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.calibrate import (
    BN_SHIFT_LIMIT,
    CALIBRATED_FLAG,
    DataDriftMeter,
    UncalibratedModelError,
    calibrate,
    is_calibrated,
    require_calibrated,
    uncalibrated_nodes,
)


class BnNet(nn.Module):
    """Linear -> BN -> ReLU -> Linear (prepared with fx in the tests)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _prepared(observer: str = "minmax") -> nn.Module:
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(observer=observer))
    return ql.prepare(BnNet(), example_inputs=(torch.randn(4, 6),), qconfig_setter=setter, qat_mode="with_bn")


def _batches(n: int = 5, shift: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, generator=g) + shift, torch.zeros(16)) for _ in range(n)]


def test_calibrate_sets_the_flag_and_minmax_scales_match_a_float64_recomputation() -> None:
    node = ql.FakeQuantize(ql.qint8, "minmax")
    holder = nn.Sequential(node)
    batches = _batches(4)
    assert calibrate(holder, batches, num_batches=3) == 3
    assert bool(getattr(holder, CALIBRATED_FLAG)) and is_calibrated(holder)
    amax = max(float(b[0].double().abs().max()) for b in batches[:3])
    torch.testing.assert_close(node.scale.double(), torch.tensor(amax / 127, dtype=torch.float64))
    assert node.state is ql.FakeQuantState.VALIDATION


def test_calibrate_through_a_torch_compile_wrapper_marks_the_network() -> None:
    """``calibrate(torch.compile(model), ...)`` ran every batch, then failed to set the flag."""
    model = _prepared()
    reference = _prepared()
    batches = [(x, y) for x, y in _batches(3)]
    assert calibrate(torch.compile(model, backend="eager"), batches) == 3
    calibrate(reference, batches)
    assert is_calibrated(model) and is_calibrated(torch.compile(model, backend="eager"))
    require_calibrated(model, "test")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_an_empty_loader_raises_and_leaves_the_model_uncalibrated() -> None:
    model = _prepared()
    model.train()
    states = {name: node.state for name, node in ql.iter_fake_quantize(model)}
    with pytest.raises(ValueError, match="calibration loader is empty"):
        calibrate(model, [])
    assert not is_calibrated(model)
    assert all(not bool(node.scale_ready) for _, node in ql.iter_fake_quantize(model))
    assert {name: node.state for name, node in ql.iter_fake_quantize(model)} == states
    assert all(m.training for m in model.modules())


def test_uncalibrated_model_gets_one_clear_error_or_one_warning() -> None:
    model = _prepared()
    missing = uncalibrated_nodes(model)
    assert missing and all("." in name for name in missing)
    expected = rf"my QAT: the model is not calibrated: {len(missing)} of"
    with pytest.raises(UncalibratedModelError, match=expected):
        require_calibrated(model, "my QAT")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert require_calibrated(model, "my QAT", strict=False) == missing
    assert len(caught) == 1 and "strict=False" in str(caught[0].message)
    calibrate(model, _batches())
    assert require_calibrated(model, "my QAT") == []


def test_a_model_calibrated_by_hand_without_the_flag_counts_as_calibrated() -> None:
    model = _prepared()
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for x, _ in _batches():
            model(x)
    assert not hasattr(model, CALIBRATED_FLAG)
    assert require_calibrated(model, "analysis") == []


def test_drift_meter_measures_the_bn_shift_without_changing_the_model() -> None:
    model = _prepared()
    calibrate(model, _batches())
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    bn.running_mean.normal_()  # any statistics: the measure is relative to them
    bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn.momentum = 0.0
    seen: list[torch.Tensor] = []
    bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    meter = DataDriftMeter(model)
    meter.active = True
    with torch.no_grad():
        for x, _ in _batches(3, shift=4.0):
            model(x)
            meter.batches += 1
    drift = meter.close()
    std = (bn.running_var.double() + bn.eps).sqrt()
    mean = torch.cat(seen).mean(0)  # one mean over every sample measured, not the worst batch
    expected = float(((mean - bn.running_mean.double()).abs() / std).max())
    assert drift.batches == 3 and drift.bn_name and drift.bn_samples == 48
    assert drift.bn_shift == pytest.approx(expected, rel=1e-5)
    assert drift.bn_mismatch == (expected > BN_SHIFT_LIMIT)
    assert drift.range_ratio > 0 and drift.range_name
    for key, value in model.state_dict().items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    n = len(seen)
    model(_batches(1)[0][0])  # hooks removed: nothing more measured
    assert len(seen) == n + 1 and meter.batches == 3


def _drift_of_small_batches(shift: float, batch: int, batches: int = 40) -> float:
    """The BN shift measured on ``batches`` batches of ``batch`` samples drawn from the BN's own statistics.

    ``shift``: how many running std the drawn inputs' mean lies from the running mean.
    """
    model = _prepared()
    calibrate(model, _batches())
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    bn.momentum = 0.0

    def draw(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        std = module.running_var.sqrt()
        return (module.running_mean + shift * std + torch.randn_like(args[0]) * std,)

    bn.register_forward_pre_hook(draw)
    meter = DataDriftMeter(model)  # registered after ``draw``: measures what it drew
    meter.active = True
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 6, generator=g))
            meter.batches += 1
    return meter.close().bn_shift


@pytest.mark.parametrize("batch", [4, 8])
def test_drift_meter_does_not_mistake_small_batch_noise_for_drift(batch: int) -> None:
    # every BN input is drawn from the running statistics themselves: there is no drift at all, only the
    # batch means' noise (~1/sqrt(batch) running std per batch and channel, which exceeded the limit)
    torch.manual_seed(0)
    shift = _drift_of_small_batches(0.0, batch)
    assert shift < 0.5 * BN_SHIFT_LIMIT


def test_drift_meter_flags_a_real_shift_of_one_and_a_half_std() -> None:
    torch.manual_seed(0)
    shift = _drift_of_small_batches(1.5, 4)
    assert shift > BN_SHIFT_LIMIT and shift == pytest.approx(1.5, abs=0.3)


def test_calibrate_is_importable_from_the_package_faces_without_lightning() -> None:
    from qat_lightning.callbacks import calibrate as callback_calibrate
    from qat_lightning.quant import calibrate as quant_calibrate

    assert ql.calibrate is quant_calibrate is callback_calibrate


def test_reducing_statistics_across_ranks_keeps_pinned_scales(tmp_path) -> None:
    """After DDP calibration scales come from the reduced statistics, except pinned ones (one rank, gloo)."""
    import torch.distributed as dist

    from qat_lightning.quant.calibrate import reduce_observer_statistics

    nodes = nn.ModuleList([ql.FakeQuantize("qint8", "minmax") for _ in range(2)])
    ql.set_fake_quantize(nodes, "calibration")
    for node in nodes:
        node(torch.randn(100) * 2)
    ql.set_fake_quantize(nodes, "validation")
    nodes[0].scale.mul_(0.5)  # a scale set by hand (or moved by QAT), then pinned
    nodes[0].fix_scale()
    pinned = nodes[0].scale.clone()
    nodes[1].scale.mul_(0.5)  # not pinned: recomputed from the statistics
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert reduce_observer_statistics(nodes) == 2
    finally:
        dist.destroy_process_group()
    assert torch.equal(nodes[0].scale, pinned)
    assert torch.equal(nodes[1].scale, nodes[1].observer.compute_scale("qint8"))


def _measured_meter(model: nn.Module, batches: int) -> DataDriftMeter:
    meter = DataDriftMeter(model)
    meter.active = True
    with torch.no_grad():
        for x, _ in _batches(batches, shift=2.0):
            model(x)
            meter.batches += 1
    return meter


def test_drift_reduction_across_one_rank_leaves_the_measure_unchanged(tmp_path) -> None:
    """Under DDP the meter all-reduces what it saw; with one rank (gloo) that is the local measure exactly."""
    import torch.distributed as dist

    model = _prepared()
    calibrate(model, _batches())
    model.train()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
        bn.momentum = 0.0
    local = _measured_meter(model, 3).close()
    assert _measured_meter(model, 1).reduce() is False  # no process group: nothing reduced
    meter, idle = _measured_meter(model, 3), DataDriftMeter(model)  # ``idle`` saw no data on this rank
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert meter.reduce() is True
        reduced = meter.close(reduce=False)
        empty = idle.close()  # reduces first: zeros from this rank, nothing seen anywhere
    finally:
        dist.destroy_process_group()
    assert local.bn_name and local.range_name and local.batches == 3
    assert reduced == local  # same shift, ratio, names, samples and batches, bit for bit
    assert (empty.batches, empty.bn_name, empty.range_name, empty.bn_shift) == (0, "", "", 0.0)


def test_a_calibrated_range_from_a_mask_constant_is_named_in_a_warning() -> None:
    """A node that calibrated on finfo.min entries quantizes every ordinary value to 0: say so."""
    node = ql.FakeQuantize(ql.qint8, "minmax")
    holder = nn.Sequential(node)
    masked = torch.randn(4, 6)
    masked[:, 0] = torch.finfo(torch.float32).min
    with pytest.warns(RuntimeWarning, match=r"1 quant node\(s\) is >= 1e\+30 \(0\)"):
        calibrate(holder, [masked])
    assert float(node(torch.randn(4, 6)).abs().max()) == 0.0  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(nn.Sequential(ql.FakeQuantize(ql.qint8, "minmax")), [torch.randn(4, 6)])
