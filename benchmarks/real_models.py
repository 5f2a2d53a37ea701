"""Models and data trained by the post-training benchmarks (plain torch + scikit-learn; no qat_lightning).

Imported by ``ptq_accuracy.py`` and ``int16_share.py`` (the latter also runs the merge-base code in a
subprocess: ``qat_lightning`` is imported only inside ``calibrated_int8``, whose calls both versions have).

* ``digits``: scikit-learn's load_digits, 1200 training / 597 test 8x8 images, seeded split;
* ``Cnn``: conv-bn-relu x3 + linear; ``Encoder``: 4 pre-LN layers over the 8 image rows as tokens;
* ``TextEncoder``: the same layers over word tokens (``docstring_text``);
* ``add_outlier_channels``: the function-preserving LayerNorm outlier channels real encoders have;
* ``calibrated_int8``: all-int8 ``prepare`` + calibration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

Batches = list[tuple[Tensor, Tensor]]


def digits(seed: int) -> tuple[Batches, Batches]:
    """Train / test batches of load_digits (pixels scaled to [0, 1]); a seeded split."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1200, 64)]
    test = [(x[i : i + 128], y[i : i + 128]) for i in range(1200, len(y), 128)]
    return train, test


class Cnn(nn.Module):
    """conv-bn-relu x3 + linear."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32))
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.features(x).flatten(1))


class EncoderLayer(nn.Module):
    """Pre-LN self-attention + MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (d // heads) ** -0.5
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.ln1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.o(torch.matmul(att, v).transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    """Rows as tokens -> 4 encoder layers -> LayerNorm -> mean -> linear."""

    def __init__(self, d: int = 32, heads: int = 2, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        self.layers = nn.Sequential(*(EncoderLayer(d, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        t = self.embed(x.flatten(1, 2)) + self.pos
        return self.head(self.ln_f(self.layers(t)).mean(1))


class TextEncoder(nn.Module):
    """Token ids -> embedding + position -> encoder layers -> LayerNorm -> mean over tokens -> linear."""

    def __init__(
        self, vocab: int, classes: int, seq_len: int, d: int = 64, heads: int = 4, depth: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d))
        self.layers = nn.Sequential(*(EncoderLayer(d, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:  # noqa: D102
        t = self.embed(ids) + self.pos
        return self.head(self.ln_f(self.layers(t)).mean(1))


@torch.no_grad()
def add_outlier_channels(
    model: Encoder | TextEncoder, factor: float = 40.0, channels: tuple[int, ...] = (0, 1)
) -> None:
    """Scale LayerNorm channels up by ``factor`` and the Linear columns reading them down (same function)."""
    idx = list(channels)
    for layer in model.layers:
        for ln, readers in ((layer.ln1, (layer.q, layer.k, layer.v)), (layer.ln2, (layer.fc1,))):
            ln.weight[idx] *= factor
            ln.bias[idx] *= factor
            for lin in readers:
                lin.weight[:, idx] /= factor
    model.ln_f.weight[idx] *= factor
    model.ln_f.bias[idx] *= factor
    model.head.weight[:, idx] /= factor


def train(model: nn.Module, batches: Batches, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam, cross-entropy, shuffled batches."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(batches)).tolist():
            x, y = batches[i]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return 100.0 * hits / sum(len(y) for _, y in batches)


def build_model(meta: dict) -> nn.Module:
    """An untrained model from its description: ``{"kind": "digits"}`` or ``{"kind": "text", "vocab": ...,
    "classes": ..., "seq_len": ...}`` (what ``int16_share.py`` saves beside the state dict)."""
    if meta["kind"] == "digits":
        return Encoder()
    if meta["kind"] == "text":
        return TextEncoder(meta["vocab"], meta["classes"], meta["seq_len"])
    raise ValueError(f"unknown model kind {meta['kind']!r}; allowed: digits, text")


def calibrated_int8(float_model: nn.Module, calib: Batches) -> nn.Module:
    """All-int8 ``ql.prepare`` of a copy (default qconfig) + calibration on ``calib``, left in VALIDATION."""
    import copy

    import qat_lightning as ql

    qm = ql.prepare(copy.deepcopy(float_model), example_inputs=calib[0][0])
    ql.set_fake_quantize(qm, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        qm.eval()
        for x, _ in calib:
            qm(x)
    ql.set_fake_quantize(qm, ql.FakeQuantState.VALIDATION)
    return qm
