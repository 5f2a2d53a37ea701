"""Optional fused C kernels of the histogram searches (``_search_kernels.c``), with their checks.

The extension is built by ``setup.py`` when a C compiler is at hand. Each wrapper here returns ``None``
when the kernel does not apply (extension missing or switched off with ``QAT_LIGHTNING_NO_KERNELS=1``,
a tensor not on the CPU, not float64 or not contiguous); the caller then runs its ATen code, which gives
the same values (see the C file for the exact correspondence). :func:`disabled` switches the kernels off
for a block (tests and benchmarks compare both paths in one process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from qat_lightning.quant.nodes.functional import load_extension

__all__ = ["search_kernels_available", "disabled", "moments", "edge_mse", "mse_at", "kl_low", "kl_pick"]


_KERNELS: ModuleType | None = load_extension("_search_kernels")


def search_kernels_available() -> bool:
    """Whether the fused C search kernels are in use (else the ATen code: same values, slower)."""
    return _KERNELS is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the ATen code of the searches inside the block (not thread-safe: a module-wide switch)."""
    global _KERNELS
    saved, _KERNELS = _KERNELS, None
    try:
        yield
    finally:
        _KERNELS = saved


def _ok(*tensors: torch.Tensor) -> bool:
    return _KERNELS is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float64 and t.is_contiguous() for t in tensors
    )


def _threads() -> int:
    return torch.get_num_threads()


def _ptr(*tensors: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


def moments(counts: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``histogram_error.moments`` in one pass per row.

    Args:
        counts: ``(rows, cells)`` float64 histogram.
        width: ``(rows,)`` bin widths.

    Returns:
        ``(w, pre)``: ``w`` ``(rows, 1)`` (the widths, 1 where not positive) and ``pre``
        ``(3, rows, cells)`` prefix sums; None when the kernel does not apply.
    """
    width = width.double()
    if not _ok(counts, width) or counts.dim() != 2 or width.shape != counts.shape[:1]:
        return None
    rows, cells = counts.shape
    pre = counts.new_empty(3, rows, cells)
    w = counts.new_empty(rows, 1)
    _KERNELS.moments(*_ptr(counts, width, pre, w), rows, cells, _threads())
    return w, pre


def _moment_args(pre: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> bool:
    rows, cells = counts.shape
    return _ok(pre, counts, w) and pre.shape == (3, rows, cells) and w.numel() == rows


def edge_mse(
    pre: torch.Tensor,
    counts: torch.Tensor,
    w: torch.Tensor,
    first: int,
    last: int,
    qmax: int,
    with_argmin: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``histogram_error.edge_mse`` (``(rows, last - first + 1)``), and its ``argmin(1)`` if asked.

    Returns:
        ``(errors, argmin or None)``; None when the kernel does not apply.
    """
    if not _moment_args(pre, counts, w) or not 1 <= first <= last < counts.shape[1]:
        return None
    rows, cells = counts.shape
    out = counts.new_empty(rows, last - first + 1)
    arg = torch.empty(rows, dtype=torch.int64) if with_argmin else None
    arg_ptr = 0 if arg is None else arg.data_ptr()
    _KERNELS.edge_mse(*_ptr(pre, counts, w, out), arg_ptr, rows, cells, first, last, float(qmax), _threads())
    return out, arg


def mse_at(
    pre: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, row: torch.Tensor, t: torch.Tensor, qmax: int
) -> torch.Tensor | None:
    """``histogram_error.mse_at``: ``row`` ``(K,)`` with ``t`` ``(K,)``, or ``(rows, 1)`` with ``(rows, T)``.

    Returns None when the kernel does not apply.
    """
    t = t.double().contiguous()
    if not _moment_args(pre, counts, w) or row.device.type != "cpu":
        return None
    rows, cells = counts.shape
    out = torch.empty_like(t)
    if row.dim() == 1:
        if t.shape != row.shape:
            return None
        row = row.to(torch.int64).contiguous()
        row_ptr, n, per_row = row.data_ptr(), t.numel(), 0
    else:
        if t.dim() != 2 or t.shape[0] != rows:
            return None
        row_ptr, n, per_row = 0, t.numel(), t.shape[1]
    if n == 0:
        return out
    ptrs = (*_ptr(pre, counts, w), row_ptr, *_ptr(t, out))
    _KERNELS.mse_at(*ptrs, rows, cells, n, per_row, float(qmax), _threads())
    return out


def kl_low(counts: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Prefix sums, ``J`` and the divergences of the candidates ``nq .. 2 nq`` of ``kl_search``.

    Two kernel passes around one ``torch.log`` (the log of the ATen code, so the values are the same).

    Args:
        counts: ``(rows, bins + 1)`` float64 histogram (column 0, the exact zeros, is left out).
        nq: number of quantized levels.

    Returns:
        ``(cum, last, kl)``: ``cum`` ``(rows, bins + 1)`` (0, then the prefix sums of ``counts[:, 1:]``),
        ``last`` ``(rows,)`` int64, ``kl`` ``(rows, nq + 1)`` (None unless ``bins >= 2 nq``); None when the
        kernel does not apply.
    """
    if not _ok(counts) or counts.dim() != 2:
        return None
    rows, cells = counts.shape
    cum = counts.new_empty(rows, cells)
    last = torch.empty(rows, dtype=torch.int64)
    args = counts.new_empty(rows, 5 * nq + 3) if cells - 1 >= 2 * nq else None
    ptrs = _ptr(counts, cum, last)
    _KERNELS.kl_args(*ptrs, 0 if args is None else args.data_ptr(), rows, cells, nq, _threads())
    if args is None:
        return cum, last, None
    kl = counts.new_empty(rows, nq + 1)
    _KERNELS.kl_finish(*ptrs, args.log_().data_ptr(), kl.data_ptr(), rows, cells, nq, _threads())
    return cum, last, kl


def kl_pick(
    kl: torch.Tensor,
    cand0: int,
    pre: torch.Tensor,
    counts: torch.Tensor,
    w: torch.Tensor,
    amax: torch.Tensor,
    last: torch.Tensor,
    nq: int,
    qmax: int,
    tolerance: float,
    slack: float,
) -> torch.Tensor | None:
    """``kl_threshold``'s tie-break and threshold from the divergences of ``i = cand0 ..``.

    ``kl`` is ``(rows, C)``, possibly a column slice (unit column stride).

    Returns:
        ``(rows,)`` float64 thresholds; None when the kernel does not apply.
    """
    amax = amax.double().contiguous()
    last = last.to(torch.int64).contiguous()
    rows, cells = counts.shape
    if (
        not _moment_args(pre, counts, w)
        or not _ok(amax)
        or kl.dim() != 2
        or kl.dtype != torch.float64
        or kl.device.type != "cpu"
        or kl.stride(1) != 1
        or kl.shape[0] != rows
        or amax.shape != (rows,)
        or last.shape != (rows,)
        or last.device.type != "cpu"
    ):
        return None
    out = amax.new_empty(rows)
    ptrs = (kl.data_ptr(), kl.stride(0), *_ptr(pre, counts, w, amax, last, out))
    sizes = (rows, cells, kl.shape[1], cand0, nq)
    _KERNELS.kl_pick(*ptrs, *sizes, float(qmax), 1 + tolerance, slack, _threads())
    return out
