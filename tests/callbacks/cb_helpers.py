"""Tiny models, data and a LightningModule for the callback tests (also imported by the DDP script)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qat_lightning as ql
from qat_lightning.quant.ops import OpInfo, OpKind

IN, HIDDEN, CLASSES = 8, 16, 4


# ----------------------------------------------------------------------------------------------- data
@functools.cache
def _dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(CLASSES, IN, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, IN, generator=g) * 2.0 + 0.5
    y = (x @ teacher.T).argmax(1)
    return x, y


def make_loader(
    n: int = 256,
    seed: int = 0,
    scale: float = 1.0,
    batch_size: int = 32,
    shuffle: bool = False,
    shift: float = 0.0,
):
    x, y = _dataset(n, seed)
    return DataLoader(TensorDataset(x * scale + shift, y), batch_size=batch_size, shuffle=shuffle)


class ResumableLoader:
    """A DataLoader wrapper with ``state_dict`` / ``load_state_dict`` (Lightning's mid-epoch resume protocol).

    It counts the batches handed out in the current epoch; after ``load_state_dict`` the next epoch
    iteration skips that many, so a run resumed from a mid-epoch checkpoint sees the same batches.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.dataset, self.batch_size = loader, loader.dataset, loader.batch_size
        self._given = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._given = skip
        for i, batch in enumerate(self.loader):
            if i >= skip:
                self._given += 1
                yield batch

    def state_dict(self) -> dict:
        return {"given": self._given}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state["given"])


class TinyData(pl.LightningDataModule):
    """Synthetic 4-class problem; ``train_scale`` / ``train_shift`` simulate a preprocessing mismatch."""

    def __init__(
        self,
        train_scale: float = 1.0,
        val_scale: float = 1.0,
        n_train: int = 256,
        n_val: int = 128,
        train_shift: float = 0.0,
        resumable: bool = False,
    ):
        super().__init__()
        self.resumable = resumable
        self.train_scale, self.val_scale, self.n_train, self.n_val = train_scale, val_scale, n_train, n_val
        self.train_shift = train_shift

    def train_dataloader(self):
        loader = make_loader(self.n_train, 0, self.train_scale, shift=self.train_shift)
        return ResumableLoader(loader) if self.resumable else loader

    def val_dataloader(self):
        return make_loader(self.n_val, 1, self.val_scale)

    def test_dataloader(self):
        return make_loader(self.n_val, 2, self.val_scale)


# ----------------------------------------------------------------------------------------------- float model
class TinyNet(nn.Module):
    """Linear -> BN -> ReLU -> Linear -> ReLU -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.bn1 = nn.BatchNorm1d(HIDDEN)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        return self.head(self.relu2(self.fc2(self.relu1(self.bn1(self.fc1(x))))))


@functools.cache
def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loader = make_loader(256, 0, shuffle=False)
    for _ in range(40):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return copy.deepcopy(net.state_dict())


def trained_tiny_net() -> TinyNet:
    """A float TinyNet trained to convergence on the synthetic data (cached weights, fresh module)."""
    net = TinyNet()
    net.load_state_dict(_trained_state())
    return net


# ------------------------------------------------------------------------------------- hand-made prepared
class QLinear(nn.Module):
    """A gemm op following the ``quant/ops.py`` contract (input, weight and output quant nodes)."""

    def __init__(self, name: str, fin: int, fout: int, producer: str | None, out_dtype=ql.qint8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / fin**0.5)
        self.bias = nn.Parameter(torch.zeros(fout))
        self.op_info = OpInfo(
            name, "Linear", OpKind.GEMM, name, input_producers=(producer,), flops=fin * fout
        )
        self.input_quant = nn.ModuleList([ql.FakeQuantize(ql.float32, "minmax", name=name)])
        self.weight_quant = ql.FakeQuantize(ql.qint8, "minmax", ch_axis=0, num_channels=fout, name=name)
        self.output_quant = ql.FakeQuantize(out_dtype, "minmax", name=name)

    def forward(self, x):
        return self.output_quant(F.linear(self.input_quant[0](x), self.weight_quant(self.weight), self.bias))


class QInput(nn.Module):
    """A QuantStub-like op (output quant only)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.op_info = OpInfo(name, "quant", OpKind.INPUT, name)
        self.input_quant = nn.ModuleList()
        self.weight_quant = None
        self.output_quant = ql.FakeQuantize(ql.qint8, "minmax", name=name)

    def forward(self, x):
        return self.output_quant(x)


class HandQuantNet(nn.Module):
    """quant -> fc1 -> relu -> head.fc : a prepared model built by hand (no prepare() needed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant = QInput("quant")
        self.fc1 = QLinear("fc1", IN, HIDDEN, "quant")
        self.head = nn.Module()
        self.head.fc = QLinear("head.fc", HIDDEN, CLASSES, "fc1")
        self.quant_op_order = ["quant", "fc1", "head.fc"]

    def forward(self, x):
        return self.head.fc(torch.relu(self.fc1(self.quant(x))))


# ----------------------------------------------------------------------------------------------- lightning
class LitClassifier(pl.LightningModule):
    """Holds the network as ``self.model``; logs ``val_loss`` and ``val_acc``."""

    def __init__(
        self,
        net: str = "trained",
        lr: float = 0.01,
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = {"trained": trained_tiny_net, "fresh": TinyNet, "hand": HandQuantNet}[net]()
        self.example_input_array = torch.randn(4, IN)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return self.model(batch[0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        kind = self.hparams.scheduler
        if kind is None:
            return opt
        if kind == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
        elif kind == "linear_warmup":
            sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
        elif kind == "lambda_warmup":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        elif kind == "sequential_warmup":
            warm = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=3)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
        else:
            raise ValueError(kind)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Crash(pl.Callback):
    """Raise at a given global step (a simulated kill mid-training)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"simulated crash at step {self.at_step}")


def make_trainer(tmp_path: Path, callbacks, max_epochs: int = 1, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer logging to TensorBoard under ``tmp_path``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=TensorBoardLogger(str(tmp_path), name="run", version=kwargs.pop("version", 0)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quant node's scale (a copy)."""
    return {name: node.scale.detach().clone() for name, node in ql.iter_fake_quantize(model)}


def accuracy(model: nn.Module, loader) -> float:
    """Plain accuracy of ``model`` (eval mode, no grad) over ``loader``."""
    was = model.training
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was)
    return hits / total
