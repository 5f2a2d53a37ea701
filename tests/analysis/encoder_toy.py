"""A calibrated TinyEncoder (the audit's model) and a cosine ``eval_fn`` for the search tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import qat_lightning as ql
from tests.models import TinyEncoder


def calibrated_encoder(
    check_dir: Path, setter: ql.QconfigSetter | None = None, n: int = 32
) -> tuple[nn.Module, Tensor]:
    """Return a TinyEncoder prepared with ``setter`` (default: all qint8), calibrated, in VALIDATION."""
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    (x,) = TinyEncoder.example_inputs(n)
    setter = setter or ql.QconfigSetter(reference_qconfig=ql.get_qconfig(), templates=[])
    qm = ql.prepare(model, example_inputs=(x[:2],), qconfig_setter=setter, check_dir=check_dir)
    ql.set_fake_quantize(qm, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        qm(x)
    ql.set_fake_quantize(qm, ql.FakeQuantState.VALIDATION)
    return qm.eval(), x


def cosine_eval(model: nn.Module, x: Tensor) -> Callable[[nn.Module], float]:
    """``eval_fn``: cosine (float64) of the model's output with ``model``'s own float output on ``x``."""
    with torch.no_grad(), ql.fake_quant_disabled(model):
        ref = model(x).detach().double().flatten()

    def eval_fn(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x).double().flatten()
        return float(out @ ref / (out.norm() * ref.norm()))

    return eval_fn
