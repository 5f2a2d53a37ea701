"""Wrong argument types get a TypeError/ValueError naming the argument where they arrive, not a deep error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.checks import (
    require_bool,
    require_count,
    require_finite,
    require_module,
    require_number_in,
    require_positive_finite,
    require_str,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.relu(self.bn(self.conv(x))))


# ------------------------------------------------------------------------------------------- bool flags
@pytest.mark.parametrize("flag", ["no", "False", 0, 1, None])
def test_fake_quantize_refuses_a_non_bool_ignore_nonfinite(flag: object) -> None:
    with pytest.raises(TypeError, match=r"FakeQuantize 'x': ignore_nonfinite must be True or False"):
        ql.FakeQuantize(ql.qint8, ignore_nonfinite=flag, name="x")  # type: ignore[arg-type]
    assert ql.FakeQuantize(ql.qint8, ignore_nonfinite=True).observer.ignore_nonfinite is True


@pytest.mark.parametrize(("value", "error"), [("0.5", TypeError), (0.0, ValueError), (1.5, ValueError)])
def test_fake_quantize_refuses_a_bad_qat_averaging_constant(value: object, error: type) -> None:
    with pytest.raises(error, match=r"qat_averaging_constant must be a number in \(0, 1\]"):
        ql.FakeQuantize(ql.qint8, qat_averaging_constant=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- modules
def test_set_fake_quantize_and_friends_want_a_module() -> None:
    with pytest.raises(TypeError, match="set_fake_quantize: expected an nn.Module.*got str"):
        ql.set_fake_quantize("model", "QAT")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fake_quant_state: expected an nn.Module"):
        with ql.fake_quant_disabled("model"):  # type: ignore[arg-type]
            pass


def test_check_model_wants_a_module() -> None:
    with pytest.raises(TypeError, match="check_model: expected an nn.Module.*got str"):
        ql.check_model("model")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- fusion
def test_fuse_modules_names_a_missing_module_and_the_children_there() -> None:
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'bnn'.*no module.*children of Tiny: conv, bn, relu, body"):
        ql.fuse_modules(model, [["conv", "bnn"]])
    with pytest.raises(ValueError, match=r"'body.2'.*children of body: 0, 1"):
        ql.fuse_modules(model, [["body.0", "body.2"]])
    with pytest.raises(ValueError, match=r"'bdy.0'.*children of Tiny: conv, bn, relu, body"):
        ql.fuse_modules(model, [["conv", "bn", "relu"], ["bdy.0", "body.1"]])
    assert [type(m) for m in model.children()] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Sequential]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fuse_modules_refuses_a_flat_group_list_and_a_non_module() -> None:
    with pytest.raises(ValueError, match="groups must be a list of groups.*got a group of str"):
        ql.fuse_modules(Tiny(), ["conv", "bn"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="a fuse group is a list of module paths"):
        ql.fuse_modules(Tiny(), [[1, "bn"]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="fuse_modules: expected an nn.Module"):
        ql.fuse_modules("model", [["conv", "bn"]])  # type: ignore[arg-type]
    fused = ql.fuse_modules(Tiny(), [["conv", "bn", "relu"]])
    assert isinstance(fused.bn, nn.Identity)


# ------------------------------------------------------------------------------------------- helpers
def test_the_shared_checks() -> None:
    assert require_bool("f", False) is False
    with pytest.raises(TypeError, match="who: f must be True or False, got 'yes'"):
        require_bool("f", "yes", "who")
    assert require_count("n", 3) == 3 and require_count("n", None, allow_none=True) is None
    assert require_count("n", 0, minimum=0) == 0
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="n must be a positive int"):
            require_count("n", bad)
    with pytest.raises(ValueError, match="n must be an int >= 2 or None, got 1"):
        require_count("n", 1, minimum=2, allow_none=True)
    assert require_positive_finite("s", 2) == 2.0
    for bad, error in ((0, ValueError), (float("inf"), ValueError), (True, TypeError), ("1", TypeError)):
        with pytest.raises(error, match="s must be a finite number > 0"):
            require_positive_finite("s", bad)
    assert require_finite("r", 0) == 0.0
    with pytest.raises(ValueError, match="r must be a finite number >= 0"):
        require_finite("r", float("nan"))
    assert require_number_in("c", 1, low=0.0, high=1.0) == 1.0
    with pytest.raises(ValueError, match=r"c must be a number in \[0, 1\), got 1"):
        require_number_in("c", 1, low=0.0, high=1.0, include_low=True, include_high=False)
    assert require_str("t", "") == ""
    with pytest.raises(ValueError, match="t must be a non-empty str"):
        require_str("t", " ", empty=False)
    layer = nn.ReLU()
    assert require_module(layer, "who") is layer
    with pytest.raises(TypeError, match="who: expected an nn.Module for model, got int 3"):
        require_module(3, "who", "model")


def test_observer_flags_and_a_zero_fixed_threshold_are_refused() -> None:
    from qat_lightning.quant.observers import make_observer

    with pytest.raises(TypeError, match="ignore_nonfinite must be True or False"):
        make_observer("minmax", ignore_nonfinite="no")
    with pytest.raises(ValueError, match="threshold must be finite and > 0"):
        make_observer("fixed", threshold=0.0)
    dead_channel = make_observer("fixed", ch_axis=0, num_channels=2, threshold=[0.0, 1.0])
    assert dead_channel.threshold.tolist() == [0.0, 1.0]
