"""bisect_model_blocks after AdaRound: the blocks in float run the original float weights (float_reference).

Every probe is recomputed on a copy of the prepared model taken before AdaRound: the ops outside the float
blocks get AdaRound's rounded weights (their whole state), the ops inside keep the float ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import qat_lightning as ql
from qat_lightning.analysis import partial
from qat_lightning.ptq import AdaRoundConfig, adaround
from tests.ptq.models import ConvChain, calibrated, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _rounded() -> tuple[nn.Module, nn.Module, list[Tensor]]:
    """A calibrated ConvChain after AdaRound, its copy from before AdaRound, the batches."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 2, 6, 6, generator=gen) for _ in range(3)]
    torch.manual_seed(0)
    qm = calibrated(perturb(ConvChain()), xs)
    reference = copy.deepcopy(qm)
    adaround(qm, xs, config=AdaRoundConfig(iterations=20))
    return qm, reference, xs


def _out(model: nn.Module, x: Tensor, state: ql.FakeQuantState | None = None) -> Tensor:
    with torch.no_grad():
        if state is None:
            return model(x)
        with ql.fake_quant_state(model, state):
            return model(x)


def _probe_model(qm: nn.Module, reference: nn.Module, blocks: tuple[str, ...]) -> nn.Module:
    """The reference copy, every op outside ``blocks`` as AdaRound left it (rounded weight, pinned scale)."""
    probe = copy.deepcopy(reference)
    rounded = dict(ql.iter_quant_ops(qm))
    for name, op in ql.iter_quant_ops(probe):
        if name not in blocks:
            op.load_state_dict(rounded[name].state_dict())
    return probe


def test_bisection_probes_measure_float_blocks_against_the_float_model() -> None:
    qm, reference, xs = _rounded()
    x = xs[0]
    want = _out(reference, x, ql.FakeQuantState.FLOAT).double()
    assert float((_out(qm, x, ql.FakeQuantState.FLOAT).double() - want).abs().max()) > 1e-3  # FLOAT moved

    def eval_fn(model: nn.Module) -> float:  # higher is better: minus the L1 error against the float model
        return -float((_out(model, x).double() - want).abs().mean())

    candidates = partial.block_patterns(qm)
    result = partial.bisect_model_blocks(qm, eval_fn, target=-1e-5, candidates=candidates)
    assert result.float_metric == pytest.approx(0.0, abs=1e-6)  # all blocks in float: the float model
    assert result.found and result.quantized_metric < -1e-3
    assert len(result.probes) > 2
    for blocks, metric in result.probes:
        probe = _probe_model(qm, reference, blocks)
        with partial.float_ops(probe, blocks):
            expected = eval_fn(probe)
        assert metric == pytest.approx(expected, rel=1e-6, abs=1e-7), blocks
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(qm))
