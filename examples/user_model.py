"""A user's own LightningModule + LightningDataModule, to plug into ``qat-lightning`` by ``_target_``.

Nothing here knows about quantization: the app reaches the network as ``pl_module.<prepare.submodule>``
(here ``net``), reads the metric the module logs (here ``val_acc``) and builds everything else itself::

    qat-lightning model._target_=examples.user_model.WineClassifier \
        data._target_=examples.user_model.WineDataModule \
        prepare.submodule=net target.metric=val_acc

(run from the repository root: ``qat-lightning`` puts the current directory on ``sys.path`` like
``python -m`` does, so ``examples.user_model`` imports; for your own code use your package's path.)

Data: scikit-learn's ``load_wine`` (ships with scikit-learn): 178 wines, 13 chemical measurements in their
own units, from hue ~1 to proline ~1700 mg/L — the model normalizes them itself with a BatchNorm.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class WineDataModule(L.LightningDataModule):
    """``load_wine`` split 75/25 (seeded); batches are ``(features, label)``."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_wine

        wine = load_wine()
        x = torch.from_numpy(wine.data.astype(np.float32))
        y = torch.from_numpy(wine.target.astype(np.int64))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        cut = int(0.75 * len(y))
        self.train_set = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val_set = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size)


class WineClassifier(L.LightningModule):
    """A BatchNorm-normalized MLP; the network is ``self.net``, the metric ``val_acc``."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.BatchNorm1d(13),
            nn.Linear(13, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )
        self.example_input_array = torch.zeros(4, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return [opt], [sched]
