"""keep_heap: glibc keeps freed memory mapped (measured in a subprocess: the setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qat_lightning.quant.backends import keep_heap
from qat_lightning.quant.backends.heap import _glibc

_CHILD = """
import json, resource, sys, torch
import qat_lightning as ql
from qat_lightning.quant.backends import keep_heap
applied = keep_heap() if sys.argv[1] == "keep" else None
def step():  # a forward/backward-like pattern: grow to 24 x 4 MiB, free from the top, grow again
    live = [torch.ones(2**20) for _ in range(24)]
    while live:
        live.pop()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    # a heap that maps every tensor above 128 KiB on its own (no dynamic threshold): without keep_heap each
    # step re-faults its 96 MiB (24576 pages), deterministically
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_keep_heap_stops_the_page_faults_of_regrown_memory() -> None:
    default = _faults("default")
    assert default["faults"] > 5 * 24576 // 2  # 5 steps: the memory is handed back and re-faulted
    kept = _faults("keep")
    assert kept["applied"] is True
    assert kept["faults"] < 5 * 24576 // 20  # kept mapped (a stray 4 MiB block at most)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_bytes": 0}, "keep_bytes"),
        ({"keep_bytes": 2**31}, "keep_bytes"),
        ({"keep_bytes": 1.5e9}, "keep_bytes"),
        ({"mmap_threshold": 64 * 2**20}, "mmap_threshold"),
        ({"mmap_threshold": True}, "mmap_threshold"),
    ],
)
def test_keep_heap_rejects_sizes_out_of_range(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        keep_heap(**kwargs)
