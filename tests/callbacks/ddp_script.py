"""2-process CPU DDP run (gloo), launched by test_ddp.py: calibration + QAT + reports + ONNX export.

Usage: python ddp_script.py <out_dir>. Each rank calibrates on its own shard (DistributedSampler), then
writes its scales to <out_dir>/scales_rank<k>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from cb_helpers import LitClassifier, TinyData, make_loader, scales  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from qat_lightning.callbacks import (  # noqa: E402
    Calibration,
    ExportOnnx,
    PrepareQuantization,
    QuantAnalysisCallback,
    QuantizationAwareTraining,
    QuantStatsMonitor,
)
from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize  # noqa: E402
from qat_lightning.quant.qconfig.qconfig import get_qconfig  # noqa: E402
from qat_lightning.quant.qconfig.setter import QconfigSetter  # noqa: E402


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    setter = QconfigSetter(reference_qconfig=get_qconfig(observer="minmax"))
    lit = LitClassifier()
    calib = Calibration(num_batches=None)  # the whole shard: 4 batches of 32 per rank
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=0,
        logger=TensorBoardLogger(str(out_dir), name="run", version=0),
        callbacks=[
            PrepareQuantization(setter),
            calib,
            QuantStatsMonitor(),
            QuantAnalysisCallback(num_steps=1),
            ExportOnnx(check_batches=None),  # rank zero checks on the whole val split (4 batches)
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(lit, datamodule=TinyData())
    rank = trainer.global_rank
    seen = {name: int(node.observer.num_batches) for name, node in iter_fake_quantize(lit.model)}
    torch.save(
        {"scales": scales(lit.model), "batches": calib.batches_used, "seen": seen},
        out_dir / f"calib_rank{rank}.pt",
    )

    qat = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=TensorBoardLogger(str(out_dir), name="run", version=1),
        callbacks=[
            PrepareQuantization(setter),
            Calibration(),
            QuantizationAwareTraining(),
            QuantStatsMonitor(),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    qat.fit(lit, datamodule=TinyData())
    torch.save({"state": lit.model.state_dict()}, out_dir / f"qat_rank{qat.global_rank}.pt")
    fit_loaders(out_dir, setter)


def fit_loaders(out_dir: Path, setter: QconfigSetter) -> None:
    """Calibration on the loaders passed to ``fit()`` (no datamodule): each rank reads its own shard."""
    lit = LitClassifier()
    calib = Calibration(num_batches=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=0,
        logger=False,
        callbacks=[PrepareQuantization(setter), calib],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(lit, make_loader(256, 0), make_loader(128, 1))
    torch.save(
        {"scales": scales(lit.model), "batches": calib.batches_used},
        out_dir / f"fit_loaders_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
