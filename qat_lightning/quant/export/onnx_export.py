"""``export_onnx``: a prepared model as a QDQ ONNX file plus its encodings.

How: the model is traced by torch's TorchScript ONNX exporter (``dynamo=False``) in export semantics
(:mod:`~qat_lightning.quant.export.points`), with constant folding (conv + BN are folded because the
prepared model computes the folded weight in eval mode), at opset 20 — that exporter's highest. The graph
pass (:mod:`~qat_lightning.quant.export.qdq_graph`) then writes the QDQ nodes and raises the opset to 21
(int16 ``QuantizeLinear``). The TorchScript exporter is used because it runs the model's Python with real
tensors: the ``torch.export``-based exporter traces with fake tensors and rejects the quant ops' memory
checks (``data_ptr``). Files are written to temporary names and moved into place only when both are
complete: a failed export leaves no partial file and keeps older files intact.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from qat_lightning.quant import FakeQuantState, fake_quant_state, iter_fake_quantize
from qat_lightning.quant.export.encodings import (
    QuantEncoding,
    build_encodings,
    encodings_json,
    encodings_path,
)
from qat_lightning.quant.export.opsets import EXPORT_OPSETS
from qat_lightning.quant.export.points import CUSTOM_DOMAIN, export_points
from qat_lightning.quant.export.qdq_graph import rewrite_quant_points
from qat_lightning.quant.export.restore import eval_restoring
from qat_lightning.quant.nodes.switches import GlobalFakeQuantSwitch
from qat_lightning.quant.outputs import flatten_outputs, graph_output_name

__all__ = ["EXPORT_OPSETS", "ExportError", "ExportResult", "export_onnx"]

"""Opsets ``export_onnx`` writes. 21 is the first with int16 QuantizeLinear/DequantizeLinear; 20 (int8 and
float16 only) is for runtimes that reject opset-21 QDQ, e.g. onnxruntime's default session on some graphs
(see ``qat_lightning.analysis.export_check``)."""

_TRACE_OPSET = 20


class ExportError(RuntimeError):
    """The model could not be exported (the message names the op / node and what to do)."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        encodings_path: the encodings JSON beside it.
        opset: default-domain opset of the file.
        input_names: graph input names (the model's argument names / dict keys).
        output_names: graph output names (``output_0``, ``output_0-1``, dict keys; see ``graph_output_name``).
        encodings: one entry per quant node of the model.
        num_qdq: number of ``DequantizeLinear`` nodes in the graph.
        num_fp16_casts: number of float16 ``Cast`` pairs placed in the graph (one per call of a float16
            quant point that fake casts: a node the example inputs do not reach, or reach only while
            ``FakeCast`` is off, places none; a float16 weight is an initializer + one ``Cast``).
        size_bytes: size of the ONNX file.
    """

    path: Path
    encodings_path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    encodings: tuple[QuantEncoding, ...]
    num_qdq: int
    num_fp16_casts: int
    size_bytes: int


class _Flat(nn.Module):
    """Positional tensors in, a tuple of tensors out (what the exporter wants)."""

    def __init__(self, model: nn.Module, kw_names: tuple[str, ...] | None) -> None:
        super().__init__()
        self.model = model
        self.kw_names = kw_names

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        out = (
            self.model(**dict(zip(self.kw_names, args, strict=True))) if self.kw_names else self.model(*args)
        )
        return tuple(t for _, t in flatten_outputs(out))


def _normalize(example_inputs: Any) -> tuple[tuple[Tensor, ...], tuple[str, ...] | None]:
    """Return the example inputs as positional tensors and, for a dict, their names.

    Raises:
        TypeError: for inputs that are not tensors.
        ValueError: for no inputs (an empty tuple, list or dict).
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        items = [(k, v) for k, v in example_inputs.items() if v is not None]
        bad = [k for k, v in items if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"example_inputs values must be tensors; not tensors: {', '.join(map(str, bad))}")
        if items:
            return tuple(v for _, v in items), tuple(str(k) for k, _ in items)
    elif isinstance(example_inputs, (tuple, list)) and all(isinstance(v, Tensor) for v in example_inputs):
        if example_inputs:
            return tuple(example_inputs), None
    else:
        raise TypeError(f"{_INPUTS_KINDS}, got {type(example_inputs).__name__}")
    raise ValueError(f"{_INPUTS_KINDS}, got an empty {type(example_inputs).__name__}")


_INPUTS_KINDS = "example_inputs must be a tensor, a non-empty tuple/list of tensors or a dict of tensors"


def _check_arguments(model: Any, opset: Any, path: Path, dynamic_batch: Any) -> None:
    """Refuse a bad argument of :func:`export_onnx` (ValueError / TypeError, not ExportError).

    Raises:
        TypeError: for a model that is not a module, an opset that is not an int or a non-bool
            ``dynamic_batch``.
        ValueError: for an opset outside ``EXPORT_OPSETS`` or a path that does not end with ``.onnx``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module prepared by ql.prepare, got {type(model).__name__}")
    allowed = ", ".join(map(str, EXPORT_OPSETS))
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int; allowed: {allowed}, got {opset!r}")
    if opset not in EXPORT_OPSETS:
        raise ValueError(f"opset {opset!r} is not supported; allowed: {allowed}")
    if path.suffix != ".onnx":
        raise ValueError(f"path must end with .onnx (the encodings go beside it), got {str(path)!r}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be True or False, got {dynamic_batch!r}")


def _input_names(model: nn.Module, n: int) -> tuple[str, ...]:
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return tuple(params[:n]) if len(params) >= n else tuple(f"input.{i}" for i in range(n))


def _has_scale(node: nn.Module) -> bool:
    """Whether an integer node has a scale (reading ``scale`` first computes it from new statistics)."""
    _ = node.scale
    return bool(node.scale_ready) or bool(node.is_fixed)


def _switched_off(model: nn.Module, example_inputs: Any, names: list[str]) -> list[str]:
    """Return the nodes of ``names`` that a forward on ``example_inputs`` reaches only with the switch off.

    Such a node never observes data in calibration (``GlobalFakeQuantSwitch.disable()`` inside the forward
    makes it a pass-through), so it has no scale. One forward in eval mode, nodes in ``FLOAT``; any failure
    gives ``[]`` (the plain message).
    """
    wanted = {name: node for name, node in iter_fake_quantize(model) if name in names}
    calls: dict[str, list[bool]] = {}
    handles = [
        node.register_forward_pre_hook(
            lambda mod, args, name=name: calls.setdefault(name, []).append(GlobalFakeQuantSwitch._enabled)
        )
        for name, node in wanted.items()
    ]
    try:
        args, kw_names = _normalize(example_inputs)
        with eval_restoring(model), fake_quant_state(model, FakeQuantState.FLOAT), torch.no_grad():
            model(**dict(zip(kw_names, args, strict=True))) if kw_names else model(*args)
    except Exception:  # noqa: BLE001 - only a hint for the message
        return []
    finally:
        for handle in handles:
            handle.remove()
    return [name for name in names if calls.get(name) and not any(calls[name])]


def _switch_note(model: nn.Module, example_inputs: Any, cold: list[str]) -> str:
    """Return the part of the no-scale message that names ``GlobalFakeQuantSwitch`` when it is the cause."""
    off = _switched_off(model, example_inputs, cold)
    if not off:
        return ""
    which = (
        "them" if off == cold else ", ".join(off[:8]) + (f" and {len(off) - 8} more" if len(off) > 8 else "")
    )
    return (
        f"; the model's forward runs {which} only while GlobalFakeQuantSwitch is disabled, so calibration "
        "never observed them: keep the switch on while calibrating, or give these nodes the float32 dtype "
        "(e.g. a ModuleNameTemplate) to keep them float"
    )


def _check_model(model: nn.Module, opset: int, path: Path, example_inputs: Any = None) -> None:
    """Refuse a model that cannot be exported with these (valid) arguments, with an ExportError."""
    nodes = list(iter_fake_quantize(model))
    if not nodes:
        raise ExportError(
            "the model has no quant nodes: export a model prepared by ql.prepare (and calibrated)"
        )
    cold = [name for name, n in nodes if n.dtype.is_integer and not _has_scale(n)]
    if cold:
        shown = ", ".join(cold[:8]) + (f" and {len(cold) - 8} more" if len(cold) > 8 else "")
        raise ExportError(
            f"quant nodes without a scale (calibrate or train the model first): {shown}"
            + _switch_note(model, example_inputs, cold)
        )
    int16 = [name for name, n in nodes if n.dtype.bits == 16 and n.dtype.is_integer]
    if int16 and opset < 21:
        raise ExportError(f"int16 quant points need opset >= 21, got opset={opset} (e.g. {int16[0]})")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {str(path)!r}: {str(parent)!r} is not a writable directory")


def _trace(
    flat: _Flat, args: tuple[Tensor, ...], names: tuple[str, ...], out_names: tuple[str, ...], dynamic: bool
) -> onnx.ModelProto:
    axes = {n: {0: "batch"} for n, a in zip(names, args, strict=True) if a.dim() > 0} if dynamic else None
    if axes is not None:
        axes.update({n: {0: "batch"} for n in out_names})
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # MultiheadAttention's fused kernel has no ONNX form
    try:
        _run_exporter(flat, args, buf, names, out_names, axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load_from_string(buf.getvalue())


def _run_exporter(
    flat: _Flat,
    args: tuple[Tensor, ...],
    buf: io.BytesIO,
    names: tuple[str, ...],
    out_names: tuple[str, ...],
    axes: dict[str, dict[int, str]] | None,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            flat,
            args,
            buf,
            dynamo=False,
            opset_version=_TRACE_OPSET,
            input_names=list(names),
            output_names=list(out_names),
            dynamic_axes=axes,
            custom_opsets={CUSTOM_DOMAIN: 1},
            do_constant_folding=True,
        )


def _describe_failure(exc: Exception) -> str:
    """Return the exporter's first message line plus the module path and source line of the op it names."""
    text = str(exc)
    head = text.strip().split("\n")[0]
    op = re.search(r"'((?:aten|prim|onnx)::\w+)'", head)
    where = ""
    if op is not None:
        for line in text.split("\n"):
            if f"= {op.group(1)}(" in line and "scope:" in line:
                scope, _, source = line.split("scope:", 1)[1].partition("#")
                parts = [seg.rpartition("::")[2] for seg in scope.strip().split("/")[1:]]
                path = ".".join(p for p in parts[1:] if p)  # parts[0] is the prepared model itself
                where = f" at node {path or '<model>'!r} ({source.strip()})"
                break
    return f"torch.onnx could not export the model: {head}{where}"


def _write_atomic(files: list[tuple[Path, bytes]]) -> None:
    """Write every file to a temporary name in its folder, then move them all into place."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = 21,
    dynamic_batch: bool = True,
) -> ExportResult:
    """Write ``model`` (a prepared, calibrated model; exported as VALIDATION) as a QDQ ONNX model.

    Integer quant points become ``QuantizeLinear`` → ``DequantizeLinear`` with the node's own scale and
    zero point 0 (``int8`` or ``int16``; per-channel weights with ``axis``, stored as integer initializers),
    float16 points become a saturating ``Cast`` pair, float32 ops stay float; a node reached while
    ``GlobalFakeQuantSwitch`` (or, float16, ``FakeCast``) is off stays float, as in the forward. A norm op
    with a float16 output is written as its fp16 simulation (every intermediate a ``Cast`` pair, see
    :mod:`~qat_lightning.quant.export.norms`). ``path.with_suffix(".encodings.json")`` gets the encodings
    (:mod:`~qat_lightning.quant.export.encodings`). The model is left as it was (node states, each
    submodule's train/eval flag, the process switches), also when the export fails.

    Args:
        model: the prepared model.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        path: the ``.onnx`` file to write (its folder must exist).
        opset: default-domain opset, see ``EXPORT_OPSETS``.
        dynamic_batch: make dim 0 of every input and output symbolic (``batch``).

    Raises:
        ValueError: for an opset outside ``EXPORT_OPSETS``, a path that does not end with ``.onnx`` or no
            example inputs.
        TypeError: for a model that is not a module, example inputs that are not tensors, an opset that
            is not an int or a non-bool ``dynamic_batch``.
        ExportError: what cannot be exported: a model without quant nodes or scales, int16 points with
            opset 20, an unwritable folder, or an op the exporter cannot write (the message names it).
            No file is written on any error.
    """
    path = Path(path)
    _check_arguments(model, opset, path, dynamic_batch)
    args, kw_names = _normalize(example_inputs)
    _check_model(model, opset, path, example_inputs)
    names = kw_names or _input_names(model, len(args))
    flat = _Flat(model, kw_names)
    with eval_restoring(model), export_points(model) as points, torch.no_grad():
        out_names = tuple(
            graph_output_name(n)
            for n, _ in flatten_outputs(
                flat.model(**dict(zip(kw_names, args, strict=True))) if kw_names else flat.model(*args)
            )
        )
        if not out_names:
            raise ExportError("the model returned no tensor output: nothing to export")
        try:
            proto = _trace(flat, args, names, out_names, dynamic_batch)
        except Exception as exc:  # the exporter's own message names the op; add the node
            raise ExportError(_describe_failure(exc)) from exc
    placed = rewrite_quant_points(proto, opset)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
    encodings = build_encodings(points, placed)
    data = proto.SerializeToString()
    enc_path = encodings_path(path)
    _write_atomic([(path, data), (enc_path, encodings_json(encodings, opset).encode())])
    casts = sum(1 for q in placed if q.cast)
    return ExportResult(
        path=path,
        encodings_path=enc_path,
        opset=opset,
        input_names=tuple(names),
        output_names=out_names,
        encodings=tuple(encodings),
        num_qdq=len(placed) - casts,
        num_fp16_casts=casts,
        size_bytes=len(data),
    )
