"""The post-training algorithms refuse bad counts, configs and models before changing anything."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from qat_lightning.ptq import AdaRoundConfig, adaround, bias_correction, equalize
from tests.ptq.models import ConvChain, calibrated


def _xs() -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 2, 6, 6, generator=gen) for _ in range(3)]


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("bad", [1.5, "2", True, 2.0])
def test_non_integer_num_batches_are_type_errors(bad: object) -> None:
    xs = _xs()
    float_model = ConvChain().eval()
    model = calibrated(ConvChain(), xs)
    before_float, before = _params(float_model), _params(model)
    match = rf"num_batches must be a positive int or None.*got {bad!r}"
    with pytest.raises(TypeError, match="equalize: " + match):
        equalize(float_model, xs, num_batches=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bias_correction: " + match):
        bias_correction(model, xs, num_batches=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="adaround: " + match):
        adaround(model, xs, num_batches=bad)  # type: ignore[arg-type]
    assert _same(float_model, before_float) and _same(model, before)


def test_a_non_positive_num_batches_stays_a_value_error() -> None:
    with pytest.raises(ValueError, match="equalize: num_batches must be a positive int"):
        equalize(ConvChain().eval(), _xs(), num_batches=0)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"iterations": "5"}, TypeError, "iterations must be a positive int, got '5'"),
        ({"iterations": 2.5}, TypeError, "iterations must be a positive int"),
        ({"batch_size": True}, TypeError, "batch_size must be a positive int"),
        ({"max_samples": 0}, ValueError, "max_samples must be a positive int"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"seed": 1.0}, TypeError, "seed must be an int >= 0"),
        ({"lr": "0.1"}, TypeError, "lr must be a finite number > 0"),
        ({"reg_weight": float("nan")}, ValueError, "reg_weight must be a finite number >= 0"),
        ({"warmup": 1.0}, ValueError, r"warmup must be a number in \[0, 1\)"),
        ({"warmup": None}, TypeError, r"warmup must be a number in \[0, 1\)"),
    ],
)
def test_adaround_config_fields_are_checked(changes: dict, error: type, match: str) -> None:
    with pytest.raises(error, match="AdaRoundConfig: " + match):
        AdaRoundConfig(**changes)


def test_adaround_config_must_be_a_config() -> None:
    xs = _xs()
    model = calibrated(ConvChain(), xs)
    before = _params(model)
    with pytest.raises(TypeError, match="config must be an AdaRoundConfig.*got dict"):
        adaround(model, xs, config={"iterations": 5})  # type: ignore[arg-type]
    assert _same(model, before)


def test_cle_rounds_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="cle_rounds must be a positive int, got 1.5"):
        equalize(ConvChain().eval(), _xs(), cle_rounds=1.5)  # type: ignore[arg-type]


def test_a_model_that_is_not_a_module_is_a_type_error() -> None:
    xs = _xs()
    with pytest.raises(TypeError, match="equalize: expected an nn.Module"):
        equalize("model", xs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bias_correction: expected an nn.Module"):
        bias_correction("model", xs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="adaround: expected an nn.Module"):
        adaround("model", xs)  # type: ignore[arg-type]
