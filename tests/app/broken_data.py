"""A deliberately broken pipeline for stage=troubleshoot: training images preprocessed differently."""

from __future__ import annotations

from torch.utils.data import TensorDataset

from qat_lightning.example import DigitsDataModule


class MisprocessedDigits(DigitsDataModule):
    """The digits with the training split scaled x4 and shifted (validation unchanged)."""

    def setup(self, stage: str | None = None) -> None:
        """Split as usual, then mis-normalize the training images."""
        if self.train_set is not None:
            return
        super().setup(stage)
        images, labels = self.train_set.tensors
        self.train_set = TensorDataset(images * 4.0 + 1.0, labels)
