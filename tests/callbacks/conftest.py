"""Fixtures for the callback tests: the tiny LightningModule / DataModule live in ``cb_helpers``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cb_helpers import LitClassifier, TinyData  # noqa: E402


@pytest.fixture
def lit() -> LitClassifier:
    """A LightningModule wrapping the trained float TinyNet as ``self.model``."""
    return LitClassifier()


@pytest.fixture
def data() -> TinyData:
    """The synthetic datamodule (train 256 / val 128 samples, batch 32)."""
    return TinyData()


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """Silence Lightning's advisory warnings about workers and logging intervals."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        yield
