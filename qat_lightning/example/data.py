"""The built-in example's data: scikit-learn's ``load_digits`` (ships inside scikit-learn, no download).

1797 handwritten digits, each an 8×8 image whose pixels count the inked cells of a 4×4 block of the
original 32×32 bitmap, so every pixel lies in [0, 16] and a whole image in [0, 1024] inked cells. The
datamodule keeps these physical units (no normalization): the model normalizes what it needs and also
uses the raw ink count, a feature with a known, wide range.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "load_digits_tensors", "PIXEL_MAX", "INK_MAX"]

PIXEL_MAX = 16.0  # inked cells per pixel (4×4 block)
INK_MAX = 1024.0  # inked cells per image (32×32 bitmap)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images, labels)``: images ``(N, 1, 8, 8)`` float32 in [0, 16], labels int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


class DigitsDataModule(L.LightningDataModule):
    """Stratified train/validation split of ``load_digits``; batches are ``(images, labels)``.

    The test and predict dataloaders serve the validation split (the dataset has no separate test set).

    Args:
        batch_size: samples per batch.
        val_fraction: share of each class held out for validation, in (0, 1).
        seed: seed of the split and of the training shuffle.
        num_workers: dataloader worker processes (0 = load in the main process; the data is 0.5 MB).
        train_fraction: share of the remaining training samples to use (1.0 = all), for quick runs.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        train_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_fraction = train_fraction
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and split them (idempotent)."""
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        gen = torch.Generator().manual_seed(self.seed)
        train_idx: list[torch.Tensor] = []
        val_idx: list[torch.Tensor] = []
        for cls in range(10):
            idx = torch.nonzero(labels == cls).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = max(1, round(len(idx) * self.val_fraction))
            val_idx.append(idx[:n_val])
            keep = max(1, round((len(idx) - n_val) * self.train_fraction))
            train_idx.append(idx[n_val : n_val + keep])
        tr = torch.cat(train_idx).sort().values
        va = torch.cat(val_idx).sort().values
        self.train_set = TensorDataset(images[tr], labels[tr])
        self.val_set = TensorDataset(images[va], labels[va])

    def _loader(self, train: bool) -> DataLoader:
        self.setup()
        dataset = self.train_set if train else self.val_set
        shuffle = train
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=gen,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Return shuffled training batches."""
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader:
        """Return validation batches, in a fixed order."""
        return self._loader(train=False)

    def test_dataloader(self) -> DataLoader:
        """Return the validation split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Return the validation split."""
        return self.val_dataloader()
