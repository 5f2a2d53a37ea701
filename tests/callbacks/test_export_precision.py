"""ExportOnnx under ``bf16-true``: the deployed QDQ model is float32, exported from a float32 copy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cb_helpers import make_loader, make_trainer

from qat_lightning.callbacks import Calibration, ExportOnnx, PrepareQuantization, QuantizationAwareTraining

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.filterwarnings("ignore:Calibration uses only")
def test_bf16_true_fit_exports_a_float32_model_that_onnxruntime_matches(tmp_path, lit, data) -> None:
    export = ExportOnnx(path="m.onnx", check_batches=2)
    callbacks = [PrepareQuantization(), Calibration(num_batches=4), QuantizationAwareTraining(), export]
    trainer = make_trainer(
        tmp_path, callbacks, limit_train_batches=3, limit_val_batches=2, precision="bf16-true"
    )
    trainer.fit(lit, datamodule=data)
    assert {p.dtype for p in lit.model.parameters()} == {torch.bfloat16}  # the trained model is untouched
    outcome = export.outcome
    assert outcome is not None and outcome.check is not None and outcome.check.passed, outcome
    session = ort.InferenceSession(str(outcome.result.path))
    assert session.get_inputs()[0].type == "tensor(float)"
    x = make_loader(64, 1).dataset.tensors[0][:32]
    reference = copy.deepcopy(lit.model).float().eval()  # the bf16 weights, exactly, in float32
    with torch.no_grad():
        expected = reference(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert (got.argmax(1) == expected.argmax(1)).all()
