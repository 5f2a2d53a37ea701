"""Argument checks of the analysis entry points (plain python + torch, no framework imports).

Each check runs where the argument arrives, before anything is computed, recorded or written, and raises
with a message naming the argument, what it accepts and what it got: a number is a real number (not a
bool or a string) in its range, finite; a count is a positive ``int``; a flag is ``True``/``False``; a
dataloader gives at least one batch; a model to search is prepared and calibrated; a sensitivity table
names ops of the model it is used with.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from qat_lightning.analysis.ort_sessions import check_optimization
from qat_lightning.quant.calibrate import UncalibratedModelError, require_calibrated
from qat_lightning.quant.checks import check_number
from qat_lightning.quant.checks import require_bool as check_bool
from qat_lightning.quant.checks import require_count as check_count
from qat_lightning.quant.ops import iter_quant_ops
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityTable

__all__ = [
    "ANALYSIS_REFERENCES",
    "SENSITIVITY_METHODS",
    "check_bool",
    "check_count",
    "check_export_arguments",
    "check_number",
    "check_out_dir",
    "check_probes",
    "check_reference",
    "check_table_names",
    "load_onnx_model",
    "nonempty",
    "require_searchable",
]

T = TypeVar("T")

SENSITIVITY_METHODS = ("exact", "approximate")
"""``QuantAnalysis.sensitivity`` methods."""
ANALYSIS_REFERENCES = ("float", "onnxruntime")
"""What ``QuantAnalysis``'s per-layer comparison measures the calibrated model against."""


def _prefix(who: str) -> str:
    return f"{who}: " if who else ""


def nonempty(items: Iterable[T], message: str) -> Iterator[T]:
    """Return an iterator over ``items`` after checking that there is a first one.

    The first item is read now (a lazy dataloader is not materialized), so an empty dataloader is
    refused before the caller drops or overwrites anything.

    Raises:
        ValueError: with ``message`` when ``items`` gives nothing.
    """
    it = iter(items)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(message) from None
    return chain([first], it)


def require_searchable(model: Any, who: str, eval_fn: Any = None) -> nn.Module:
    """Refuse what a precision search cannot run on: a non-module, an unprepared or uncalibrated model.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module`` or ``eval_fn`` (when given) is not callable.
        ValueError: when it has no quantized op (a float model: prepare it first).
        UncalibratedModelError: when its quant nodes never saw calibration data (as ``QuantAnalysis``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{who}: model must be an nn.Module prepared by prepare(), got {type(model).__name__}"
        )
    if not any(True for _ in iter_quant_ops(model)):
        raise ValueError(
            f"{who}: the model has no quantized ops; pass the calibrated model returned by prepare() "
            "(qat_model = qat_lightning.prepare(model, example_inputs=...), then calibrate it)"
        )
    try:
        require_calibrated(model, who)
    except UncalibratedModelError as err:  # same check and error as QuantAnalysis; a search has no strict=
        raise UncalibratedModelError(str(err).split(", or pass strict=False")[0]) from None
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"{who}: eval_fn must be a callable eval_fn(model) -> float, got {eval_fn!r}")
    return model


def check_out_dir(out_dir: Any, who: str) -> Path:
    """Return ``out_dir`` as a path after checking that neither it nor a folder above it is a file.

    Raises:
        ValueError: naming the file in the way (the reports could not be written there).
    """
    folder = Path(out_dir)
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"{who}: out_dir {str(folder)!r}: {str(existing)!r} is a file, not a folder")
            break
    return folder


def check_table_names(tables: Sequence[SensitivityTable], op_names: Iterable[str], who: str) -> None:
    """Warn about table rows whose op name is not an op of the model; refuse tables where none is.

    Args:
        tables: the sensitivity tables given to a search.
        op_names: the names of the model's quantized ops.
        who: the search (named in the messages).

    Raises:
        ValueError: when the tables have rows but no row names an op of the model (a table of another
            model, or of the model before it was prepared again). Tables without rows pass.
    """
    known = set(op_names)
    names = list(dict.fromkeys(r.op_name for t in tables for r in t.rows))
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    if len(unknown) == len(names):
        raise ValueError(
            f"{who}: no row of the sensitivity table(s) names an op of this model (a table of another "
            f"model?): {shown}; the model's ops are e.g. {', '.join(sorted(known)[:5])}"
        )
    warnings.warn(f"{who}: sensitivity table: these names match no op: {shown}", stacklevel=3)


def check_reference(reference: str, onnx_path: str | os.PathLike | None) -> Path | None:
    """Validate ``QuantAnalysis``'s ``reference``/``onnx_path`` together; return the path (``None``: float).

    Raises:
        ValueError: for an unknown reference, an ``onnx_path`` given with ``float``, or a missing file.
    """
    if reference not in ANALYSIS_REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; allowed: {', '.join(ANALYSIS_REFERENCES)}")
    if reference == "float":
        if onnx_path is not None:
            raise ValueError("onnx_path is used with reference='onnxruntime' only")
        return None
    if onnx_path is None:
        raise ValueError("reference='onnxruntime' needs onnx_path= (a file export_onnx wrote)")
    path = Path(onnx_path)
    for needed in (path, path.with_suffix(".encodings.json")):
        if not needed.is_file():
            raise ValueError(f"reference='onnxruntime': no file {needed} (export the model with export_onnx)")
    return path


def check_probes(method: str, num_probes: Any) -> int:
    """Validate ``QuantAnalysis.sensitivity``'s ``method`` and ``num_probes``; return the probe count.

    ``num_probes`` (default 1) applies to the approximate method only: the exact method measures every
    op and has no probes, so a count given with it is refused rather than ignored.

    Raises:
        ValueError: for an unknown method, a count given with ``method="exact"`` or a count below 1.
        TypeError: for a count that is not an int.
    """
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SENSITIVITY_METHODS)}")
    if method == "exact" and num_probes is not None:
        raise ValueError(
            'sensitivity: num_probes applies to method="approximate" only (the exact method has no '
            f"probes), got num_probes={num_probes!r}"
        )
    return int(check_count("num_probes", 1 if num_probes is None else num_probes, "sensitivity") or 1)


def load_onnx_model(path: Path) -> Any:
    """Parse ``path`` as an ONNX model (``onnx.ModelProto``).

    Raises:
        ValueError: naming the file when it does not parse as ONNX or holds no graph (an empty file
            parses as an empty model).
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{str(path)!r} is not an ONNX model (it does not parse: {err})") from err
    if proto.ir_version < 1 or not proto.graph.output:
        raise ValueError(
            f"{str(path)!r} is not an ONNX model (no graph in it): pass the file export_onnx wrote"
        )
    return proto


def check_export_arguments(
    onnx_path: Any, out_dir: Any, thresholds: dict[str, Any], num_batches: Any
) -> Path:
    """Validate ``check_export``'s arguments where they arrive, before anything runs; return the ONNX path.

    Args:
        onnx_path: the file to check (must exist).
        out_dir: where the reports go (``None``: the file's folder); neither it nor a folder above it
            may be a file.
        thresholds: ``min_cosine`` (in [-1, 1]), ``min_top1`` (in [0, 1]), ``min_sqnr_db`` (finite) and
            ``optimization`` (one of ``ORT_OPTIMIZATIONS``).
        num_batches: a positive int or ``None``.

    Raises:
        TypeError: for a threshold that is not a number or a count that is not an int.
        ValueError: for a value out of its range, a missing file or an ``out_dir`` that is a file.
    """
    who = "check_export"
    check_number("min_cosine", thresholds["min_cosine"], who, low=-1.0, high=1.0)
    check_number("min_top1", thresholds["min_top1"], who, low=0.0, high=1.0)
    check_number("min_sqnr_db", thresholds["min_sqnr_db"], who)
    check_count("num_batches", num_batches, who, allow_none=True)
    check_optimization(thresholds["optimization"])
    path = Path(onnx_path)
    if not path.is_file():
        raise ValueError(f"no ONNX file at {str(path)!r}: run export_onnx first")
    check_out_dir(out_dir if out_dir is not None else path.parent, who)
    return path
