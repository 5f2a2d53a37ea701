"""Tiny reusable test models (CPU, milliseconds): import them from any test.

* :class:`TinyResNet` - conv-bn-relu stem, max pool, two basic blocks (residual ``out += identity``, one
  with a conv-bn downsample, ``self.relu`` used twice as in torchvision), global average pool, linear head.
* :class:`TinyEncoder` - a 2-layer transformer encoder written from Linear / LayerNorm / GELU / softmax /
  matmul (op names like ``layers.0.attn.matmul_1``).
* :class:`DataDependentModel` - ``if x.sum() > 0`` picks a branch: fx cannot trace it.
* :class:`CheckModel` - the seed's check-report example: a ``QuantStub`` (``quant``) that a test can give a
  fixed scale, a ``conv`` called twice (shared module), a conv followed by a ReLU that is not fused
  (because the conv is shared), and a ``DeQuantStub``.
* :func:`tiny_bert` - ``transformers.BertModel`` with random weights, built offline;
  :func:`tiny_bert_classifier` - ``BertForSequenceClassification`` with a chosen attention implementation.
* :func:`j6p_gemm_int8_setter` - the j6p tuning recipe's setter (gemm inputs int8, every other op fp16).

Every model has an ``example_inputs()`` classmethod/function returning the positional inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """ResNet-style CNN: input (N, 3, 16, 16) -> logits (N, 10)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, 16, 16),)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (d // h) ** -0.5
        attn = F.softmax(scores, dim=-1)
        out = torch.matmul(attn, v)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyEncoder(nn.Module):
    """Pre-norm transformer encoder: input (N, S, dim) -> (N, S, dim)."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    @staticmethod
    def example_inputs(batch: int = 2, seq: int = 8, dim: int = 16) -> tuple[torch.Tensor]:
        return (torch.randn(batch, seq, dim),)


class DataDependentModel(nn.Module):
    """``if x.sum() > 0`` decides the branch (fx cannot trace it); also an ``x * 2`` eager cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Conv2d(4, 4, 1)
        self.neg = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.pos(x) if x.sum() > 0 else self.neg(x)
        return self.act(x * 2)

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, 8, 8),)


class CheckModel(nn.Module):
    """The seed's check example: ``quant`` -> ``conv`` twice (shared) -> ``relu`` -> ``dequant``."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.conv(x)
        x = self.relu(self.conv(x))
        return self.dequant(x)

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.rand(batch, 4, 8, 8) * 200.0,)


def tiny_bert(seed: int = 0) -> nn.Module:
    """``BertModel`` (hidden 32, 2 layers, 2 heads, intermediate 64, vocab 100), random weights, eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return BertModel(config).eval()


def tiny_bert_classifier(attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    """``BertForSequenceClassification`` (hidden 64, 2 layers, 2 heads, vocab 200), random weights, eval."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=200,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def j6p_gemm_int8_setter() -> object:
    """The j6p tuning recipe's ``QconfigSetter``: gemm inputs int8, every other op's output fp16."""
    import qat_lightning as ql

    return ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(),
        templates=[
            ql.ModuleNameTemplate({"": ql.float16}),
            ql.ConvDtypeTemplate(input_dtype=ql.qint8, weight_dtype=ql.qint8),
            ql.MatmulDtypeTemplate(input_dtypes=ql.qint8),
        ],
        chip="j6p",
    )


def bert_inputs(batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Keyword example inputs of :func:`tiny_bert`."""
    return {"input_ids": torch.randint(0, 100, (batch, seq))}


class GeluResidual(nn.Module):
    """``b(gelu(a(x)) + x)`` on 8 features: eager mode cannot see the functional gelu and add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x)) + x)
