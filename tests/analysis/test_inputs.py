"""qat_lightning.analysis.inputs: how a batch becomes the model's arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_lightning.analysis.inputs import call_model, default_input_fn


class TakesX(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_dict_batch_is_passed_as_keyword_args():
    out = call_model(TakesX(), default_input_fn({"x": torch.ones(2)}))
    assert torch.equal(out, torch.full((2,), 2.0))


def test_dict_batch_the_model_does_not_take_names_input_fn():
    batch = {"x": torch.ones(2), "labels": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"input_fn=") as info:
        call_model(TakesX(), default_input_fn(batch))
    assert "labels" in str(info.value) and "TakesX" in str(info.value)


def test_type_errors_inside_forward_are_not_rewritten():
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise TypeError("bad operand")

    with pytest.raises(TypeError, match="^bad operand$"):
        call_model(Broken(), {"x": torch.ones(1)})
