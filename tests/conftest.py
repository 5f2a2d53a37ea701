"""Shared fixtures: deterministic seeds and clean global quant switches around every test."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

SEED = 0


def _seed_all(value: int) -> None:
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state (torch, ``random``, numpy)."""
    _seed_all(SEED)


@pytest.fixture
def seed() -> int:
    """The seed every test starts from; request it to re-seed explicitly or to derive other seeds."""
    _seed_all(SEED)
    return SEED


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread (tiny tensors: threads only add barrier waits on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    """A private torch generator seeded with 0 (does not touch the global RNG)."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_quant_switches() -> Iterator[None]:
    """Re-enable GlobalFakeQuantSwitch and FakeCast after each test, so a failing test cannot leak."""
    yield
    from qat_lightning.quant.nodes.switches import FakeCastSwitch, GlobalFakeQuantSwitch

    GlobalFakeQuantSwitch.enable()
    FakeCastSwitch.enable()
