"""calibrate() leaves the model as it was when a batch fails, and refuses bad arguments before any batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.calibrate import CalibrationError, calibrate, is_calibrated


class _Net(nn.Module):
    """conv -> bn -> relu -> pool -> linear (histogram observers, a BN: every kind of buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 6, 6, generator=g), torch.zeros(4)) for _ in range(n)]


def _prepared(qat_mode: str = "with_bn") -> nn.Module:
    torch.manual_seed(0)
    model = ql.prepare(_Net().eval(), example_inputs=torch.randn(2, 1, 6, 6), qat_mode=qat_mode)
    calibrate(model, _batches(3))
    return model


def _raw(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer and parameter as stored, without the state_dict hooks (which may refresh a scale)."""
    tensors = dict(model.named_buffers())
    tensors.update(dict(model.named_parameters()))
    return {k: v.detach().clone() for k, v in tensors.items()}


def _nodes(model: nn.Module) -> dict[str, tuple[object, ...]]:
    return {
        n: (fq.state, fq.dtype, fq.scale_mode, fq.is_fixed, fq._dirty, fq._scale_known, fq.training)
        for n, fq in ql.iter_fake_quantize(model)
    }


def _assert_identical(model: nn.Module, raw: dict[str, torch.Tensor], nodes: dict[str, tuple]) -> None:
    after = _raw(model)
    assert after.keys() == raw.keys()
    changed = [k for k in raw if not torch.equal(raw[k], after[k])]
    assert not changed, changed
    assert _nodes(model) == nodes


@pytest.mark.parametrize("state", ["validation", "calibration", "qat"])
def test_a_failing_batch_restores_the_model_bit_identically_and_names_the_batch(state: str) -> None:
    model = _prepared()
    ql.set_fake_quantize(model, state)
    model.train(state == "qat")
    raw, nodes = _raw(model), _nodes(model)
    bad = _batches(2) + [(torch.randn(4, 3, 6, 6), None)]  # 3 channels instead of 1
    with pytest.raises(CalibrationError, match=r"batch 2\b") as info:
        calibrate(model, bad)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, RuntimeError) and "channels" in str(info.value.__cause__)
    _assert_identical(model, raw, nodes)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training is (state == "qat") for m in [model, *bns])
    assert any("running_mean" in k for k in raw)  # the BN statistics were compared too
    model.state_dict()  # still saves


def test_after_a_failed_call_calibrating_again_gives_what_an_untroubled_run_gives() -> None:
    failed, clean = _prepared(), _prepared()
    ql.set_fake_quantize(failed, "calibration")
    ql.set_fake_quantize(clean, "calibration")
    with pytest.raises(CalibrationError):
        calibrate(failed, _batches(2, seed=5) + [(torch.randn(4, 2, 6, 6), None)])
    calibrate(failed, _batches(2, seed=7))
    calibrate(clean, _batches(2, seed=7))
    a, b = failed.state_dict(), clean.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_of_the_input_fn_and_of_the_loader_name_the_batch_too() -> None:
    model = _prepared()
    raw, nodes = _raw(model), _nodes(model)

    def input_fn(batch: tuple) -> torch.Tensor:
        if batch[1] is None:
            raise KeyError("image")
        return batch[0]

    with pytest.raises(CalibrationError, match=r"batch 1\b.*KeyError"):
        calibrate(model, _batches(1) + [(None, None)], input_fn=input_fn)
    _assert_identical(model, raw, nodes)

    def loader():
        yield from _batches(2)
        raise OSError("disk gone")

    with pytest.raises(CalibrationError, match=r"batch 2\b.*disk gone"):
        calibrate(model, loader())
    _assert_identical(model, raw, nodes)


def test_a_non_finite_batch_is_refused_and_the_model_still_saves() -> None:
    model = _prepared()
    raw, nodes = _raw(model), _nodes(model)
    bad = _batches(2) + [(torch.full((4, 1, 6, 6), float("nan")), None)]
    with pytest.raises(ValueError, match="non-finite"):
        calibrate(model, bad)
    _assert_identical(model, raw, nodes)
    model.state_dict()  # before the fix the poisoned observers made state_dict() itself raise


def test_an_uncalibrated_model_stays_unmarked_after_a_failure() -> None:
    torch.manual_seed(0)
    model = ql.prepare(_Net().eval(), example_inputs=torch.randn(2, 1, 6, 6))
    raw, nodes = _raw(model), _nodes(model)
    with pytest.raises(CalibrationError):
        calibrate(model, [(torch.randn(4, 2, 6, 6), None)])
    assert not is_calibrated(model)
    _assert_identical(model, raw, nodes)


@pytest.mark.parametrize("bad", [1.5, "2", True, 2.0])
def test_a_non_integer_num_batches_is_a_type_error(bad: object) -> None:
    model = _prepared()
    raw, nodes = _raw(model), _nodes(model)
    with pytest.raises(TypeError, match=rf"num_batches must be a positive int or None.*got {bad!r}"):
        calibrate(model, _batches(3), num_batches=bad)  # type: ignore[arg-type]
    _assert_identical(model, raw, nodes)


@pytest.mark.parametrize("bad", [0, -1])
def test_a_non_positive_num_batches_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        calibrate(_prepared(), _batches(3), num_batches=bad)


def test_a_model_without_quant_nodes_is_refused() -> None:
    model = _Net()
    with pytest.raises(ValueError, match="no quant node.*prepare"):
        calibrate(model, _batches(3))
    assert not hasattr(model, "qat_calibrated")


def test_wrong_model_and_loader_types_are_type_errors() -> None:
    with pytest.raises(TypeError, match="expected an nn.Module"):
        calibrate("model", _batches(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable of batches"):
        calibrate(_prepared(), 3)  # type: ignore[arg-type]
