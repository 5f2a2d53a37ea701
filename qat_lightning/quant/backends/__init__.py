"""Optional speed layers (public face). Nothing here changes a result; the default path needs none of it.

* :func:`set_backend` / :func:`get_backend`: the fake-quant backend of every quant node. ``"default"``
  (device-neutral ATen ops, what a GPU runs) or the opt-in ``"cpu_kernels"``
  (:mod:`.cpu_kernels`: fused C kernels, also registered as ``torch.library`` custom ops, for float32 CPU
  tensors in eager mode; the default path runs everywhere else, and in traced code, where inductor fuses it
  and the opaque op measured slower). The environment variable ``QAT_LIGHTNING_BACKEND`` selects one at
  import.
* :mod:`.search_kernels`: C kernels of the histogram searches (``_search_kernels.c``).
* :func:`keep_heap` (:mod:`.heap`): glibc keeps freed memory mapped (a benchmark flag).

``QAT_LIGHTNING_NO_KERNELS=1`` (or an install without a C compiler) leaves every C extension out.
"""

from __future__ import annotations

import importlib
import os
import warnings

from qat_lightning.quant.backends.heap import keep_heap
from qat_lightning.quant.nodes import functional as _functional
from qat_lightning.quant.nodes import weight_quant as _weight_quant

# the module (``quant.nodes.fake_quantize`` as an attribute is the function of that name)
_fake_quantize = importlib.import_module("qat_lightning.quant.nodes.fake_quantize")

__all__ = ["BACKENDS", "get_backend", "keep_heap", "set_backend"]

BACKENDS: tuple[str, ...] = ("default", "cpu_kernels")

_SELECTED: list[str] = ["default"]


def set_backend(name: str) -> None:
    """Select the fake-quant backend of every quant node (process-wide): ``default`` or ``cpu_kernels``.

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones).
        RuntimeError: for ``cpu_kernels`` when the C extension is not built or switched off by
            ``QAT_LIGHTNING_NO_KERNELS=1``; the backend is left unchanged.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    if name == "cpu_kernels":
        from qat_lightning.quant.backends import cpu_kernels

        if not cpu_kernels.kernels_available():
            raise RuntimeError(
                "backend 'cpu_kernels' is unavailable: qat_lightning.quant.backends._kernels was not built "
                "(no C compiler at install) or QAT_LIGHTNING_NO_KERNELS is set"
            )
        _functional._BACKEND_HOOK[:] = [cpu_kernels.quantize_on_cpu_kernels]
        _weight_quant._WEIGHT_BACKEND_HOOK[:] = [cpu_kernels.quantize_weight_on_cpu_kernels]
        _fake_quantize._OBSERVING_BACKEND_HOOK[:] = [cpu_kernels.quantize_and_observe_on_cpu_kernels]
    else:
        _functional._BACKEND_HOOK.clear()
        _weight_quant._WEIGHT_BACKEND_HOOK.clear()
        _fake_quantize._OBSERVING_BACKEND_HOOK.clear()
    _SELECTED[0] = name


def get_backend() -> str:
    """Return the selected fake-quant backend name."""
    return _SELECTED[0]


def _select_from_environment() -> None:
    name = os.environ.get("QAT_LIGHTNING_BACKEND", "").strip()
    if not name:
        return
    try:
        set_backend(name)
    except (ValueError, RuntimeError) as err:
        warnings.warn(f"QAT_LIGHTNING_BACKEND={name!r} ignored: {err}", RuntimeWarning, stacklevel=2)


_select_from_environment()
