"""``SanityCheck(mode="lr0")`` under 2-process CPU DDP (gloo), launched by test_ddp.py.

Usage: python ddp_sanity_script.py <out_dir> [devices, default 2]. The odd training samples are shifted:
with a ``DistributedSampler(shuffle=False)`` rank 1 reads all of them, rank 0 none. Each rank writes what
it judged to <out_dir>/sanity_rank<k>.json; rank zero also writes sanity_check.txt and the logged metrics
(CSV) under <out_dir>/run/version_0. ``devices=1`` gives the one-process reference on the whole set.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from cb_helpers import LitClassifier, _dataset, make_loader  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from qat_lightning.callbacks import (  # noqa: E402
    Calibration,
    PrepareQuantization,
    QuantizationAwareTraining,
    SanityCheck,
)
from qat_lightning.quant.qconfig.qconfig import get_qconfig  # noqa: E402
from qat_lightning.quant.qconfig.setter import QconfigSetter  # noqa: E402

SHIFT = 3.0
"""Added to the odd training samples: alone they drift past the BatchNorm limit, with the even ones not."""


class ShiftedOddData(pl.LightningDataModule):
    """256 training samples (odd ones shifted), 128 validation samples, batches of 32."""

    def train_dataloader(self) -> DataLoader:
        x, y = _dataset(256, 0)
        x = x.clone()
        x[1::2] += SHIFT
        data = TensorDataset(x, y)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # rank k: samples k::2
            return DataLoader(data, batch_size=32, sampler=DistributedSampler(data, shuffle=False))
        return DataLoader(data, batch_size=32, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return make_loader(128, 1)


def fit(out_dir: Path, devices: int) -> dict:
    """Run the lr0 check; return what this rank judged (and whether the run's verdict was FAIL)."""
    torch.set_num_threads(1)
    check = SanityCheck(mode="lr0", monitor="val_acc", tolerance=0.05, raise_on_failure=False)
    setter = QconfigSetter(reference_qconfig=get_qconfig(observer="minmax"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        logger=CSVLogger(str(out_dir), name="run", version=0),
        callbacks=[
            PrepareQuantization(setter),
            Calibration(num_batches=None, dataloader="val"),
            QuantizationAwareTraining(),
            check,
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LitClassifier(), datamodule=ShiftedOddData())
    failed = trainer.strategy.reduce_boolean_decision(
        any("SANITY CHECK FAILED" in str(w.message) for w in caught), all=False
    )  # rank zero warns
    drift = check.result.drift
    return {
        "rank": trainer.global_rank,
        "status": check.result.status,
        "passed": check.result.passed,
        "run_failed": bool(failed),
        "bn_shift": drift.bn_shift,
        "bn_samples": drift.bn_samples,
        "batches": drift.batches,
        "range_ratio": drift.range_ratio,
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = fit(out, devices=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    (out / f"sanity_rank{result['rank']}.json").write_text(json.dumps(result))
