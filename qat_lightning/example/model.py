"""The built-in example's model: a small CNN + attention digit classifier with one wide-range feature.

``DigitsNet`` has every op family the tuning workflow deals with: conv+BN+ReLU (fusable), a residual add,
single-head self-attention over the 8×8 positions (Linear q/k/v, two matmuls, softmax), LayerNorm,
mean pooling and a linear head.

It also does what many production models do: it concatenates a raw physical quantity with normalized
features. The *ink* of a digit — the number of inked cells of its 32×32 bitmap, range [0, 1024], 185–433
in the dataset — is appended, in its own units, to a LayerNorm-ed feature vector of magnitude ~1
(``cat``). One per-tensor int8 scale for that concat is about 433 / 127 ≈ 3.4, so most normalized
features round to 0 or ±3.4: all-int8 loses ~9 accuracy points for a real reason (the seed's "if the
maximum value exceeds 10, int8 is not recommended"). int16 (scale ≈ 0.013) on that one op — found by the
sensitivity search — recovers it; the known range also allows a fixed int16 scale
(``+recipe.module_names.cat.threshold=1024``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat_lightning.example.data import PIXEL_MAX

__all__ = ["ConvBNReLU", "ResidualBlock", "SelfAttention", "DigitsNet", "DigitsClassifier"]


class ConvBNReLU(nn.Sequential):
    """3×3 conv (no bias) + BatchNorm + ReLU: the fusable triple.

    Args:
        in_ch: input channels.
        out_ch: output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
        )


class ResidualBlock(nn.Module):
    """conv-bn-relu, conv-bn, residual add, relu.

    Args:
        ch: channels (in = out).
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(ch, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn(conv(conv_bn_relu(x))) + x)``."""
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class SelfAttention(nn.Module):
    """Pre-norm single-head self-attention with a residual: ``x + proj(softmax(q kᵀ / √d) v)``.

    Args:
        dim: token width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(batch, tokens, dim)``."""
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        attn = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
        return x + self.proj(torch.matmul(attn, v))


class DigitsNet(nn.Module):
    """CNN stem + residual block + self-attention + (features ⊕ raw ink) → 10 logits.

    Input: ``(batch, 1, 8, 8)`` pixel counts in [0, 16] (the dataset's units).

    Args:
        channels: conv channels = attention width.
        use_ink: append the raw ink count to the features (the wide-range op ``cat``). With ``False``
            the model is quantization-friendly (all-int8 works).
    """

    def __init__(self, channels: int = 12, use_ink: bool = True) -> None:
        super().__init__()
        self.use_ink = use_ink
        self.stem = ConvBNReLU(1, channels)
        self.block = ResidualBlock(channels)
        self.attn = SelfAttention(channels)
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels + int(use_ink), 10)
        if use_ink:
            with torch.no_grad():
                self.head.weight[:, -1].zero_()  # start from "ignore the ink", let training decide

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(batch, 10)``."""
        h = self.block(self.stem(x * (1.0 / PIXEL_MAX)))
        tokens = h.flatten(2).transpose(1, 2)  # (batch, 64 positions, channels)
        feat = self.norm(self.attn(tokens).mean(dim=1))
        if self.use_ink:
            ink = x.sum(dim=(2, 3))  # inked cells of the 32×32 bitmap, in [0, 1024]
            feat = torch.cat([feat, ink], dim=1)
        return self.head(feat)


class DigitsClassifier(L.LightningModule):
    """LightningModule around :class:`DigitsNet` (reached by the callbacks as ``self.model``).

    Logs ``train/loss``, ``val/loss``, ``val/acc`` (and ``test/*``). AdamW with a cosine decay over the
    run's steps and an optional linear warmup (the float recipe; the QAT stage replaces the warmup).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        channels: model width.
        use_ink: see :class:`DigitsNet`.
        warmup_steps: linear warmup steps (0 = none).
    """

    def __init__(
        self,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        channels: int = 12,
        use_ink: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsNet(channels=channels, use_ink=use_ink)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images."""
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], prefix: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        on_step = prefix == "train"
        # sync_dist: under DDP every rank gets the global metric, so the pipeline's decisions agree
        self.log(
            f"{prefix}/loss",
            loss,
            on_step=on_step,
            on_epoch=not on_step,
            prog_bar=not on_step,
            sync_dist=not on_step,
        )
        if not on_step:
            acc = (logits.argmax(dim=1) == y).float().mean()
            self.log(f"{prefix}/acc", acc, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy loss."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Loss and accuracy."""
        self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        """AdamW + (optional linear warmup then) cosine decay, stepped every batch."""
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.hparams.warmup_steps)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warm))
        if warm > 0:
            ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm)
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.SequentialLR(
                opt, [ramp, cosine], milestones=[warm]
            )
        else:
            sched = cosine
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
