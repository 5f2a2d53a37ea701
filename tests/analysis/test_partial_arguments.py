"""block_patterns / bisect_model_blocks refuse a depth that names no block level."""

from __future__ import annotations

import pytest
from analysis_toys import calibrated

from qat_lightning.analysis.partial import bisect_model_blocks, block_patterns


@pytest.mark.parametrize(
    ("depth", "error"), [(-1, ValueError), (0, ValueError), (1.5, TypeError), ("1", TypeError)]
)
def test_block_patterns_depth_is_a_positive_int_or_none(depth, error) -> None:
    with pytest.raises(error, match="depth must be a positive int or None"):
        block_patterns(calibrated(), depth=depth)


def test_bisect_model_blocks_checks_depth_before_evaluating() -> None:
    calls = []
    with pytest.raises(ValueError, match="depth must be a positive int or None"):
        bisect_model_blocks(calibrated(), lambda m: calls.append(1) or 0.0, 0.0, depth=-1, candidates=["fc1"])
    assert calls == []


def test_valid_depths() -> None:
    model = calibrated()
    assert block_patterns(model, depth=None) == block_patterns(model, depth=99)
    assert block_patterns(model, depth=1)
