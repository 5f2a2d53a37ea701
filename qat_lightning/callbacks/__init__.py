"""Lightning callbacks for the quantization accuracy-tuning workflow (the only layer that imports lightning).

Add them to ``lightning.Trainer(callbacks=[...])`` around your own LightningModule; they reach the network
as ``pl_module.<submodule>`` (default ``model``)::

    from qat_lightning.callbacks import PrepareQuantization, Calibration, QuantizationAwareTraining

    trainer = Trainer(max_epochs=3, callbacks=[
        PrepareQuantization(setter),          # model surgery in setup(), model_check_result.txt
        Calibration(num_batches=100),         # once, before training; skipped on resume
        QuantizationAwareTraining(fix_scales="input_output"),
        QuantStatsMonitor(),                  # scale / saturation curves in TensorBoard
        QuantAnalysisCallback(),              # bad cases, per-layer, sensitivity after fit
    ])
    trainer.fit(lit_module, datamodule=dm)

A calibration-only run is the same trainer with ``max_epochs=0`` (then ``trainer.save_checkpoint``).
Reload a quantized checkpoint strictly with :func:`load_quantized_checkpoint`.
"""

from qat_lightning.callbacks._common import CALIBRATED_FLAG, default_input_fn
from qat_lightning.callbacks.analysis import AnalysisOutcome, QuantAnalysisCallback, output_cosine_eval_fn
from qat_lightning.callbacks.calibration import Calibration, calibrate, reduce_observer_statistics
from qat_lightning.callbacks.export import ExportOnnx, ExportOutcome
from qat_lightning.callbacks.lr_probe import QatLrProbe
from qat_lightning.callbacks.monitor import QuantStatsMonitor
from qat_lightning.callbacks.prepare import (
    PrepareQuantization,
    load_quantized_checkpoint,
    prepare_submodule,
    recipe_of,
)
from qat_lightning.callbacks.ptq import AdaRound, BiasCorrection, Equalization
from qat_lightning.callbacks.qat import QuantizationAwareTraining, find_lr_warmup, io_quant_nodes
from qat_lightning.callbacks.sanity import SanityCheck, SanityCheckError, SanityResult
from qat_lightning.callbacks.switch import (
    BisectResult,
    FakeQuantSwitch,
    bisect_float_blocks,
    bisect_model_blocks,
    block_patterns,
    float_ops,
)

__all__ = [
    "CALIBRATED_FLAG",
    "AdaRound",
    "AnalysisOutcome",
    "BiasCorrection",
    "BisectResult",
    "Calibration",
    "ExportOnnx",
    "ExportOutcome",
    "Equalization",
    "FakeQuantSwitch",
    "PrepareQuantization",
    "QatLrProbe",
    "QuantAnalysisCallback",
    "QuantStatsMonitor",
    "QuantizationAwareTraining",
    "SanityCheck",
    "SanityCheckError",
    "SanityResult",
    "bisect_float_blocks",
    "bisect_model_blocks",
    "block_patterns",
    "calibrate",
    "default_input_fn",
    "find_lr_warmup",
    "float_ops",
    "io_quant_nodes",
    "load_quantized_checkpoint",
    "output_cosine_eval_fn",
    "prepare_submodule",
    "recipe_of",
    "reduce_observer_statistics",
]
