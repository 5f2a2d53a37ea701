"""2-process CPU DDP (gloo) QAT with learned (LSQ) scales, launched by test_ddp.py.

Usage: python ddp_learned_script.py <out_dir>. Each rank trains on its own shard (DistributedSampler) and
writes its learned ``scale_param`` values (at the last training batch and after fit), their starting values
and its optimizer layout to <out_dir>/learned_rank<k>.pt; rank zero's checkpoint goes to <out_dir>/ckpt.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from cb_helpers import LitClassifier, TinyData  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from qat_lightning.callbacks import Calibration, PrepareQuantization, QuantizationAwareTraining  # noqa: E402
from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize  # noqa: E402


def learned(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every learned scale parameter of ``module`` (a copy), by node name."""
    return {
        name: node.scale_param.detach().clone()
        for name, node in iter_fake_quantize(module)
        if node.scale_mode == "learned"
    }


class _Spy(pl.Callback):
    """Record the learned scales at train start and after the last training batch (before on_train_end)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = learned(pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self.last = learned(pl_module.model)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    lit, spy = LitClassifier(), _Spy()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        callbacks=[
            PrepareQuantization(),
            Calibration(num_batches=2),
            QuantizationAwareTraining(scales="learned"),
            spy,
            ModelCheckpoint(dirpath=out_dir / "ckpt", filename="final"),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(lit, datamodule=TinyData())
    params = {name: node.scale_param for name, node in iter_fake_quantize(lit.model) if name in spy.start}
    groups = [[id(p) for p in g["params"]] for g in trainer.optimizers[0].param_groups]
    torch.save(
        {
            "start": spy.start,
            "last": spy.last,
            "end": learned(lit.model),
            "groups": len(groups),
            "own_group": groups[-1] == [id(p) for p in params.values()],
            "elsewhere": any(id(p) in g for g in groups[:-1] for p in params.values()),
        },
        out_dir / f"learned_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
