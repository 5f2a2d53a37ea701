"""Keep freed activation memory in the process heap between training steps: :func:`keep_heap`.

glibc's ``malloc`` hands the top of its heap back to the kernel when more than a threshold of it is free,
and PyTorch's CPU tensors above that threshold come from fresh mappings. A training step frees most of
its activations in the backward pass and allocates them again in the next forward pass, so when the heap
layout is unlucky every step pays a page fault per 4 KiB of re-grown heap (on the 4-layer encoder of
``benchmarks/qat_step.py``: about 6000 faults and 5 % of the step). :func:`keep_heap` sets the two
thresholds once for the process so that the memory stays mapped; the peak memory is unchanged, but the
process keeps its peak until it exits. It is process-wide and opt-in: call it at the start of training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 * 2**20  # glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_heap(keep_bytes: int = 2**30, mmap_threshold: int = _MMAP_MAX) -> bool:
    """Let glibc keep up to ``keep_bytes`` of freed heap memory instead of returning it after each step.

    Args:
        keep_bytes: free memory at the top of the heap kept mapped (``M_TRIM_THRESHOLD``), 1 MiB to
            2 GiB - 1 (``mallopt`` takes a C ``int``).
        mmap_threshold: allocations from this size up get their own mapping (``M_MMAP_THRESHOLD``), 128 KiB
            to 32 MiB; smaller ones reuse the heap.

    Returns:
        True when set; False where the C library is not glibc (macOS, Windows, musl): nothing changes.

    Raises:
        ValueError: for a size outside its range.
    """
    for name, value, low, high in (
        ("keep_bytes", keep_bytes, 2**20, 2**31 - 1),
        ("mmap_threshold", mmap_threshold, 128 * 2**10, _MMAP_MAX),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}] bytes, got {value!r}")
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes)
    )


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc
