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
    expected = max(float(((x.mean(0) - bn.running_mean.double()).abs() / std).max()) for x in seen)
    assert drift.batches == 3 and drift.bn_name
    assert drift.bn_shift == pytest.approx(expected, rel=1e-5)
    assert drift.bn_mismatch == (expected > BN_SHIFT_LIMIT)
    assert drift.range_ratio > 0 and drift.range_name
    for key, value in model.state_dict().items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    n = len(seen)
    model(_batches(1)[0][0])  # hooks removed: nothing more measured
    assert len(seen) == n + 1 and meter.batches == 3


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
