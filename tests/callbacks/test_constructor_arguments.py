"""Every callback checks its arguments where they arrive (``__init__``); the message names what is allowed.

A count is an ``int`` (not ``True``, ``1.5``, ``2.0`` or ``"2"``), a flag is ``True`` / ``False`` (not
``"no"``), a choice lists its options, and a value that would only fail at fit time (an unknown chip, a
string as ``qconfig_setter``) is refused at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from cb_helpers import IN, LitClassifier, make_trainer

from qat_lightning.callbacks import (
    AdaRound,
    BiasCorrection,
    Calibration,
    Equalization,
    ExportOnnx,
    FakeQuantSwitch,
    PrepareQuantization,
    QatLrProbe,
    QuantAnalysisCallback,
    QuantizationAwareTraining,
    QuantStatsMonitor,
    SanityCheck,
    load_quantized_checkpoint,
)
from qat_lightning.quant.qconfig.setter import QconfigSetter

QAT = QuantizationAwareTraining

#: (id, constructor call, exception type, regex the message must contain)
REFUSED: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # counts: a bool or a non-integral value is refused
    ("calib-num_batches-float", lambda: Calibration(num_batches=1.5), TypeError,
     r"Calibration: num_batches must be an int >= 1 or None.*got 1\.5"),
    ("calib-num_batches-int-valued-float", lambda: Calibration(num_batches=2.0), TypeError, "num_batches"),
    ("calib-num_batches-bool", lambda: Calibration(num_batches=True), TypeError, "got True"),
    ("calib-num_batches-str", lambda: Calibration(num_batches="2"), TypeError, "got '2'"),
    ("qat-float_steps-float", lambda: QAT(float_steps=1.5), TypeError,
     r"QuantizationAwareTraining: float_steps must be an int >= 1 or None.*got 1\.5"),
    ("qat-float_steps-bool", lambda: QAT(float_steps=True), TypeError, "float_steps"),
    ("monitor-every_n-float", lambda: QuantStatsMonitor(every_n_validations=1.5), TypeError,
     "every_n_validations must be an int >= 1"),
    ("monitor-every_n-str", lambda: QuantStatsMonitor(every_n_validations="2"), TypeError,
     "every_n_validations"),
    ("analysis-num_steps-float", lambda: QuantAnalysisCallback(num_steps=1.5), TypeError,
     "QuantAnalysisCallback: num_steps must be an int >= 1 or None"),
    ("export-check_batches-float", lambda: ExportOnnx(check_batches=1.5), TypeError,
     "ExportOnnx: check_batches must be an int >= 0 or None"),
    ("export-check_batches-bool", lambda: ExportOnnx(check_batches=False), TypeError, "check_batches"),
    ("export-opset-float", lambda: ExportOnnx(opset=21.0), TypeError, "opset must be an int"),
    ("probe-steps-float", lambda: QatLrProbe(steps=1.5), TypeError, "QatLrProbe: steps must be an int >= 1"),
    ("probe-steps-bool", lambda: QatLrProbe(steps=True), TypeError, "steps"),
    ("probe-eval_batches-float", lambda: QatLrProbe(eval_batches=2.5), TypeError, "eval_batches"),
    ("equalization-num_batches-float", lambda: Equalization(num_batches=1.5), TypeError,
     "Equalization: num_batches must be an int >= 1 or None"),
    ("equalization-cle_rounds-float", lambda: Equalization(cle_rounds=1.5), TypeError, "cle_rounds"),
    ("bias-num_batches-float", lambda: BiasCorrection(num_batches=1.5), TypeError,
     "BiasCorrection: num_batches"),
    ("adaround-num_batches-float", lambda: AdaRound(num_batches=2.5), TypeError, "AdaRound: num_batches"),
    # bool flags: a string such as "no" is not a bool
    ("calib-force-str", lambda: Calibration(force="no"), TypeError,
     "Calibration: force must be True or False, got 'no'"),
    ("sanity-raise_on_failure-str", lambda: SanityCheck(raise_on_failure="no"), TypeError,
     "SanityCheck: raise_on_failure must be True or False"),
    ("qat-check_lr-str", lambda: QAT(check_lr="no"), TypeError, "check_lr must be True or False"),
    ("qat-strict-str", lambda: QAT(strict="no"), TypeError, "strict must be True or False"),
    ("qat-strict-int", lambda: QAT(strict=0), TypeError, "strict must be True or False"),
    ("switch-fake_cast-str", lambda: FakeQuantSwitch(fake_cast="no"), TypeError, "fake_cast"),
    ("analysis-sensitivity-str", lambda: QuantAnalysisCallback(sensitivity="no"), TypeError, "sensitivity"),
    ("analysis-run_on_fit_end-str", lambda: QuantAnalysisCallback(run_on_fit_end="no"), TypeError,
     "run_on_fit_end"),
    ("export-dynamic_batch-str", lambda: ExportOnnx(dynamic_batch="no"), TypeError, "dynamic_batch"),
    ("export-run_on_fit_end-str", lambda: ExportOnnx(run_on_fit_end="no"), TypeError, "run_on_fit_end"),
    ("probe-higher_is_better-str", lambda: QatLrProbe(higher_is_better="no"), TypeError,
     "higher_is_better"),
    # PrepareQuantization: chip and setter are checked at construction, not at fit setup
    ("prepare-chip-unknown", lambda: PrepareQuantization(chip="j7"), ValueError,
     "unknown chip 'j7'; known chips: j6e, j6m, j6p"),
    ("prepare-chip-int", lambda: PrepareQuantization(chip=6), ValueError, "known chips: j6e, j6m, j6p"),
    ("prepare-setter-str", lambda: PrepareQuantization(qconfig_setter="int8"), TypeError,
     "qconfig_setter must be a QconfigSetter, a template, a QConfig"),
    ("prepare-setter-chip-clash", lambda: PrepareQuantization(QconfigSetter(chip="j6p"), chip="j6m"),
     ValueError, "chip='j6m' disagrees with the qconfig_setter's chip 'j6p'"),
    ("prepare-input_fn", lambda: PrepareQuantization(input_fn="first"), TypeError,
     "input_fn must be a callable or None"),
    # other stored-but-unchecked arguments
    ("calib-dataloader-int", lambda: Calibration(dataloader=5), TypeError,
     "dataloader must be 'train', 'val', 'test' or an iterable of batches"),
    ("calib-input_fn", lambda: Calibration(input_fn=0), TypeError, "input_fn must be a callable or None"),
    ("calib-submodule", lambda: Calibration(submodule=None), TypeError, "submodule must be a str"),
    ("qat-submodule", lambda: QAT(submodule=1), TypeError, "submodule must be a str"),
    ("switch-disable-int", lambda: FakeQuantSwitch(disable=5), TypeError,
     "FakeQuantSwitch: disable must be a name pattern"),
    ("switch-disable-none", lambda: FakeQuantSwitch(disable=None), TypeError, "disable must be"),
    ("switch-stages-empty", lambda: FakeQuantSwitch(stages=()), ValueError,
     "stages must name at least one of: fit, validate, test, predict"),
    ("sanity-monitor-empty", lambda: SanityCheck(monitor=""), ValueError, "monitor must be a non-empty str"),
    ("sanity-tolerance-str", lambda: SanityCheck(tolerance="0.1"), TypeError,
     "tolerance must be a finite number >= 0"),
    ("sanity-tolerance-inf", lambda: SanityCheck(tolerance=math.inf), ValueError, "tolerance"),
    ("sanity-rtol-inf", lambda: SanityCheck(rtol=math.inf), ValueError, "rtol"),
    ("sanity-reference-nan", lambda: SanityCheck(reference=math.nan), ValueError,
     "reference must be a finite number or None"),
    ("sanity-reference-str", lambda: SanityCheck(reference="0.9"), TypeError, "reference"),
    ("analysis-metrics-unknown", lambda: QuantAnalysisCallback(metrics=["COSNE"]), ValueError,
     "unknown metric 'COSNE'; allowed: COSINE"),
    ("analysis-search_target-str", lambda: QuantAnalysisCallback(search_target="0.9"), TypeError,
     "search_target must be a finite number or None"),
    ("analysis-search_target-nan", lambda: QuantAnalysisCallback(search_target=math.nan), ValueError,
     "search_target"),
    ("analysis-search_eval_fn", lambda: QuantAnalysisCallback(search_eval_fn="cosine"), TypeError,
     "search_eval_fn must be a callable or None"),
    ("analysis-dirname-empty", lambda: QuantAnalysisCallback(dirname=""), ValueError, "dirname"),
    ("analysis-dataloader-int", lambda: QuantAnalysisCallback(dataloader=3), TypeError, "dataloader"),
    ("export-dataloader-int", lambda: ExportOnnx(dataloader=3), TypeError, "dataloader"),
    ("probe-lrs-number", lambda: QatLrProbe(lrs=1e-3), TypeError,
     "lrs must be one or more positive learning rates"),
    ("probe-lrs-str", lambda: QatLrProbe(lrs=("1e-3",)), TypeError, "lrs"),
    ("probe-lrs-inf", lambda: QatLrProbe(lrs=(math.inf,)), ValueError, "lrs"),
    ("probe-eval_fn", lambda: QatLrProbe(eval_fn="loss"), TypeError, "eval_fn must be a callable or None"),
    ("equalization-kinds-empty", lambda: Equalization(kinds=()), ValueError,
     "kinds must name at least one of: cross_layer, layernorm, matmul"),
    ("equalization-alphas-range", lambda: Equalization(alphas=(0.5, 1.5)), ValueError,
     r"alphas must be numbers in \[0, 1\]"),
    ("equalization-alphas-empty", lambda: Equalization(alphas=()), ValueError, "alphas"),
    ("equalization-alphas-str", lambda: Equalization(alphas=("0.5",)), TypeError, "alphas"),
    ("bias-dataloader-int", lambda: BiasCorrection(dataloader=1), TypeError, "dataloader"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "error", "match"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_argument_is_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_counts_accept_any_integer_type_and_store_an_int():
    calibration = Calibration(num_batches=np.int64(3))
    assert calibration.num_batches == 3 and type(calibration.num_batches) is int
    assert Calibration(num_batches=None).num_batches is None
    assert QAT(float_steps=np.int32(100)).float_steps == 100
    assert ExportOnnx(check_batches=0).check_batches == 0
    probe = QatLrProbe(steps=np.int64(2), eval_batches=1)
    assert (probe.steps, probe.eval_batches) == (2, 1) and type(probe.steps) is int
    assert type(QuantAnalysisCallback(num_steps=np.int64(4)).num_steps) is int


def test_a_string_is_one_choice_not_its_characters():
    assert FakeQuantSwitch(stages="test").stages == ("test",)
    assert FakeQuantSwitch(disable="head").disable == ["head"]
    assert Equalization(kinds="cross_layer").kinds == ("cross_layer",)
    assert QuantAnalysisCallback(metrics="COSINE").metrics == ("COSINE",)
    assert QatLrProbe(lrs=[1e-3, np.float32(1e-4)]).lrs == pytest.approx((1e-3, 1e-4))


def test_valid_prepare_arguments_still_pass():
    assert PrepareQuantization(chip="J6M").chip == "J6M"  # names are case-insensitive, as in get_chip
    setter = QconfigSetter(chip="j6p")
    assert PrepareQuantization(setter, chip="j6p").qconfig_setter is setter
    assert SanityCheck(reference=torch.tensor(0.5)).reference == 0.5  # a logged metric (0-d tensor)


@pytest.fixture(scope="module")
def calib_ckpt(tmp_path_factory, request):
    from cb_helpers import TinyData

    tmp_path = tmp_path_factory.mktemp("ckpt")
    trainer = make_trainer(tmp_path, [PrepareQuantization(), Calibration(num_batches=2)], max_epochs=0)
    trainer.fit(LitClassifier(), datamodule=TinyData())
    path = tmp_path / "calib.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_load_quantized_checkpoint_refuses_init_kwargs_with_an_instance(calib_ckpt):
    lit = LitClassifier()
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    with pytest.raises(TypeError, match=r"init_kwargs \(lr, no_such_arg\) apply to the class form only"):
        load_quantized_checkpoint(lit, calib_ckpt, example_inputs=torch.randn(4, IN), lr=123.0, no_such_arg=1)
    assert lit.state_dict().keys() == before.keys()  # the module was left as given (not prepared)
    assert all(torch.equal(v, before[k]) for k, v in lit.state_dict().items())
    reloaded = load_quantized_checkpoint(LitClassifier, calib_ckpt, lr=0.5)  # the class form uses them
    assert reloaded.hparams.lr == 0.5
    assert load_quantized_checkpoint(LitClassifier(), calib_ckpt) is not None  # no kwargs: fine
