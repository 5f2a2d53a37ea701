"""Learned scales with several optimizers: each ``scale_param`` is held by exactly one and stepped once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cb_helpers import LitClassifier, make_trainer

import qat_lightning as ql
from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining
from qat_lightning.callbacks._scale_group import place_learned_scales

LR = 10.0


class _TwoOptimizers(LitClassifier):
    """Manual optimization: the body in one SGD, the head (and its output scale) in another."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.moves: list[tuple[str, float, float]] = []

    def configure_optimizers(self):
        head = [p for n, p in self.model.named_parameters() if n.startswith("head")]
        body = [p for n, p in self.model.named_parameters() if not n.startswith("head")]
        return [torch.optim.SGD(body, lr=LR), torch.optim.SGD(head, lr=LR)]

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        learned = [
            (n, q.scale_param) for n, q in ql.iter_fake_quantize(self.model) if q.scale_mode == "learned"
        ]
        before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in learned}
        body.step()
        head.step()
        for name, param in learned:
            start, grad = before[name]
            self.moves.append((name, float(param.detach() - start), float(-LR * grad)))


def _holders(trainer, param) -> list[int]:
    return [
        i
        for i, opt in enumerate(trainer.optimizers)
        for group in opt.param_groups
        for p in group["params"]
        if p is param
    ]


@pytest.mark.filterwarnings("ignore:Calibration uses only")
def test_each_learned_scale_is_in_one_optimizer_and_moves_one_step(tmp_path, data) -> None:
    lit = _TwoOptimizers()
    callbacks = [
        PrepareQuantization(),
        Calibration(num_batches=4),
        QuantizationAwareTraining(scales="learned"),
    ]
    trainer = make_trainer(tmp_path, callbacks, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(lit, datamodule=data)
    learned = {n: q.scale_param for n, q in ql.iter_fake_quantize(lit.model) if q.scale_mode == "learned"}
    assert len(learned) == 4
    holders = {name: _holders(trainer, p) for name, p in learned.items()}
    assert holders["head.output_quant"] == [1]  # the user put it in the head optimizer: it stays there
    assert all(h == [0] for n, h in holders.items() if n != "head.output_quant"), holders
    own = trainer.optimizers[0].param_groups[-1]["params"]  # the others: their own group of the first
    assert {id(p) for p in own} == {id(p) for n, p in learned.items() if n != "head.output_quant"}
    assert len(lit.moves) == 2 * 4
    for name, moved, one_step in lit.moves:
        assert moved == pytest.approx(one_step, rel=1e-4, abs=1e-12), name


def test_place_learned_scales_keeps_user_placements_and_drops_duplicates() -> None:
    a, b, c, w = (torch.nn.Parameter(torch.ones(())) for _ in range(4))
    first = torch.optim.SGD([w, a, b], lr=0.1)
    second = torch.optim.SGD([b], lr=0.2)
    third = torch.optim.SGD([b, c], lr=0.3)  # b in three optimizers: the first user optimizer keeps it
    assert place_learned_scales([first, second, third], [a, b, c])
    held = [[p for g in opt.param_groups for p in g["params"]] for opt in (first, second, third)]
    assert held[0] == [w, a] and first.param_groups[-1]["params"] == [a]
    assert held[1] == [b] and held[2] == [c]
    assert not place_learned_scales([first, second, third], [a, b, c])  # idempotent
    assert not place_learned_scales([], [a])
