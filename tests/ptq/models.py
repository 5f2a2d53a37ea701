"""Tiny float models for the ptq tests (a conv-bn-relu chain, a pre-LN attention block) and calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qat_lightning as ql


def calibrated(model: nn.Module, xs: list[Tensor]) -> nn.Module:
    """``ql.prepare`` (all int8) + calibration on ``xs``; returns the model in VALIDATION state."""
    torch.manual_seed(0)
    qm = ql.prepare(model.eval(), example_inputs=xs[0])
    ql.set_fake_quantize(qm, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for x in xs:
            qm(x)
    ql.set_fake_quantize(qm, ql.FakeQuantState.VALIDATION)
    return qm


class ConvChain(nn.Module):
    """conv-bn-relu -> conv-relu -> conv -> flatten -> linear-relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.c3 = nn.Conv2d(5, 4, 1)
        self.l1 = nn.Linear(4 * 6 * 6, 12)
        self.l2 = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.c3(F.relu(self.c2(torch.relu(self.bn1(self.c1(x))))))
        return self.l2(F.relu(self.l1(x.flatten(1))))


class AttentionBlock(nn.Module):
    """Pre-LN two-head self-attention + MLP with a final LayerNorm and head (tokens of width 8)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.ln1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / 2.0, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(x.shape)
        x = x + self.o(y)
        x = x + self.fc2(F.relu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x).mean(1))


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms and BNs non-trivial affine parameters and running statistics, and some wide channels."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 3 + 0.2)
                m.weight[0] *= 20.0  # an outlier channel
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight[:, 0] *= 8.0
    return model.eval()


class DigitsMLP(nn.Module):
    """64 -> 32 (relu) -> 32 -> scaled residual -> 10 on scikit-learn's digits (a wide residual for fc3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.relu(self.fc1(x))
        return self.fc3(h + self.fc2(h) * 50.0)


def digits_mlp(steps: int = 300) -> tuple[nn.Module, nn.Module, Tensor]:
    """A :class:`DigitsMLP` trained on ``load_digits``, its calibrated int8 (minmax) prepared copy, the data.

    Calibration: the first 512 samples in 4 batches (the batches the PTQ tests use: ``X[:512].split(128)``).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(observer="minmax"), templates=[], chip="j6m")
    qm = ql.prepare(model, example_inputs=(x[:8],), qconfig_setter=setter)
    ql.set_fake_quantize(qm, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in x[:512].split(128):
            qm(batch)
    ql.set_fake_quantize(qm, ql.FakeQuantState.VALIDATION)
    return model, qm, x
