"""The callbacks in plain Python around your own LightningModule (no Hydra, no config files).

    python examples/callbacks_plain.py [--epochs 30] [--out outputs/callbacks_plain]

1. train the float model (your usual Trainer);
2. calibration-only run: ``PrepareQuantization`` + ``Calibration`` on ``trainer.validate``;
3. the seed's lr0 sanity check (``SanityCheck``) on a copy of the calibrated model;
4. QAT from the calibrated weights: ``QuantizationAwareTraining`` (no warmup) and ``QuantAnalysisCallback``
   (bad cases, per-layer comparison, sensitivity after fit);
5. reload the QAT checkpoint strictly with ``load_quantized_checkpoint``.

Files land in ``--out``: ``model_check_result.txt``, ``quant_analysis/``, ``sanity_check.txt``, TensorBoard
events (``tensorboard --logdir <out>``) and ``qat.ckpt``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qat_lightning as ql  # noqa: E402
from examples.user_model import WineClassifier, WineDataModule  # noqa: E402
from qat_lightning.callbacks import (  # noqa: E402
    Calibration,
    PrepareQuantization,
    QuantAnalysisCallback,
    QuantizationAwareTraining,
    SanityCheck,
    load_quantized_checkpoint,
)


def trainer(out: Path, name: str, callbacks: list, **kwargs) -> L.Trainer:
    logger = TensorBoardLogger(save_dir=str(out), name=name, version="")
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        **kwargs,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/callbacks_plain"))
    args = parser.parse_args(argv)
    L.seed_everything(0)
    dm = WineDataModule()

    # 1. float training, nothing special
    model = WineClassifier()
    t = trainer(args.out, "float", [], max_epochs=args.epochs)
    t.fit(model, datamodule=dm)
    float_acc = t.validate(model, datamodule=dm, verbose=False)[0]["val_acc"]

    # 2. calibration: int16 activations / int8 weights; the model input (raw measurements, proline up to
    #    ~1700 mg/L) gets a fixed range from its known physical maximum (op names are relative to `net`)
    setter = ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(weight_dtype=ql.qint8, out_dtype=ql.qint16, observer="mse"),
        templates=[ql.ModuleNameTemplate({"input_quant": {"threshold": 2000.0}})],
        chip="j6m",
    )
    calibrated = copy.deepcopy(model)
    prepare = PrepareQuantization(setter, submodule="net")
    t = trainer(args.out, "calibration", [prepare, Calibration(num_batches=10, submodule="net")])
    calib_acc = t.validate(calibrated, datamodule=dm, verbose=False)[0]["val_acc"]
    t.save_checkpoint(str(args.out / "calibration.ckpt"))

    # 3. the seed's lr0 check on a copy: QAT with every LR at 0 must score like the calibration model
    def quant_callbacks() -> list:
        return [
            PrepareQuantization(setter, submodule="net"),  # already prepared: idempotent, keeps the recipe
            Calibration(num_batches=10, submodule="net"),  # already calibrated (flag in the buffers): skipped
            QuantizationAwareTraining(submodule="net"),
        ]

    probe = copy.deepcopy(calibrated)
    check = SanityCheck(
        mode="lr0",
        monitor="val_acc",
        tolerance=0.02,
        reference=calib_acc,
        submodule="net",
        raise_on_failure=False,
    )
    trainer(args.out, "sanity_lr0", [*quant_callbacks(), check], max_epochs=1).fit(probe, datamodule=dm)

    # 4. QAT from the calibrated weights: lower LR, the model's cosine decay (no warmup), then the analysis
    calibrated.hparams.lr = 1e-3
    t = trainer(
        args.out,
        "qat",
        [*quant_callbacks(), QuantAnalysisCallback(submodule="net")],
        max_epochs=args.qat_epochs,
    )
    t.fit(calibrated, datamodule=dm)
    qat_acc = t.validate(calibrated, datamodule=dm, verbose=False)[0]["val_acc"]
    t.save_checkpoint(str(args.out / "qat.ckpt"))

    # 5. strict reload of the quantized checkpoint
    reloaded = load_quantized_checkpoint(WineClassifier, args.out / "qat.ckpt", setter, submodule="net")
    x, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        same = torch.allclose(reloaded(x), calibrated.eval()(x))
    result = {
        "float": float_acc,
        "calibration": calib_acc,
        "qat": qat_acc,
        "reload_identical": float(same),
        "sanity_lr0_passed": float(bool(check.result and check.result.passed)),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
