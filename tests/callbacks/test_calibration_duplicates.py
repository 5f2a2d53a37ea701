"""Two ``Calibration`` callbacks on one submodule in one Trainer are refused when the Trainer is built."""

from __future__ import annotations

import lightning as L
import pytest

from qat_lightning.callbacks import Calibration


def test_two_calibrations_on_one_submodule_are_refused():
    with pytest.raises(RuntimeError, match="state_key"):
        L.Trainer(callbacks=[Calibration(num_batches=1), Calibration(num_batches=2)], logger=False)


def test_calibrations_on_two_submodules_are_allowed():
    trainer = L.Trainer(
        callbacks=[Calibration(submodule="encoder"), Calibration(submodule="decoder")], logger=False
    )
    assert sum(isinstance(cb, Calibration) for cb in trainer.callbacks) == 2
