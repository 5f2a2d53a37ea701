"""Model structure and qconfig check: ``check_model(prepared)`` -> :class:`ModelCheckReport`.

The seed's ``model_check_result.txt`` sections, computed from what a prepared model carries
(``prepared.prepare_record`` and each op's quant nodes, see ``ops.py``):

* **Fusable modules**: fusable groups prepare left unfused (extra quant points cost accuracy and speed);
* **Each module called times**: 0 = never called, > 1 = shared module (each call site has its own
  activation observers, weights stay shared);
* **Each layer out qconfig**: name, type, (effective) input dtype, output dtype, ch_axis, observer;
* **Weight qconfig**: name, type, weight dtype, ch_axis, observer;
* **Please check if these OPs qconfigs are expected**: fixed scales (with the value), high-precision
  (qint16/float16/float32) outputs, float16 on a chip where it is slow, dtypes the chip does not
  support, non-gemm ops whose inputs have different dtypes, and the chip downgrades prepare made;
* **Dtype summary**: number of ops and share of FLOPs per compute dtype (a gemm's compute dtype is the
  widest of its effective inputs and weight; another op's is its output dtype).

Computing (``check_model``) and rendering (``ModelCheckReport.to_text``) are separate; ``write`` and
:func:`write_changelog` write atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tabulate import tabulate
from torch import nn

from qat_lightning.chips import ChipSpec, get_chip
from qat_lightning.quant.dtypes import DTYPES, QuantDtype, float32
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import OpInfo, OpKind, PrepareRecord, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.qconfig.setter import chip_issues
from qat_lightning.quant.qconfig.templates import precision_rank

__all__ = [
    "MODEL_CHECK_FILENAME",
    "CHANGELOG_FILENAME",
    "FusableRow",
    "CallCountRow",
    "OutQconfigRow",
    "WeightQconfigRow",
    "PromptRow",
    "DtypeSummaryRow",
    "ModelCheckReport",
    "check_model",
    "write_changelog",
]

MODEL_CHECK_FILENAME = "model_check_result.txt"
CHANGELOG_FILENAME = "qconfig_changelog.txt"


@dataclass(frozen=True)
class FusableRow:
    """One module of a fusable group left unfused (``group`` numbers the groups from 0)."""

    group: int
    name: str
    module_type: str


@dataclass(frozen=True)
class CallCountRow:
    """How often a float module was called with the example inputs (``note`` flags 0 and > 1)."""

    name: str
    count: int
    note: str


@dataclass(frozen=True)
class OutQconfigRow:
    """One op's activation quantization: effective input dtype(s), output dtype, ch_axis, observer."""

    name: str
    op_type: str
    input_dtype: str
    out_dtype: str
    ch_axis: str
    observer: str


@dataclass(frozen=True)
class WeightQconfigRow:
    """One gemm op's weight quantization."""

    name: str
    op_type: str
    weight_dtype: str
    ch_axis: str
    observer: str


@dataclass(frozen=True)
class PromptRow:
    """A qconfig to double-check (not necessarily an error)."""

    name: str
    op_type: str
    msg: str


@dataclass(frozen=True)
class DtypeSummaryRow:
    """Ops computing in one dtype: their number, FLOPs and share of all FLOPs (0..1)."""

    dtype: str
    ops: int
    flops: int
    flop_share: float


def _atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_changelog(path: str | os.PathLike[str], lines: Iterable[str]) -> None:
    """Write chip downgrades (``QconfigAssignment.changelog``) one per line, atomically.

    Args:
        path: the file, usually ``<check_dir>/qconfig_changelog.txt``.
        lines: the changelog lines (an empty changelog writes an empty file).
    """
    lines = list(lines)
    _atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str], fmt: str) -> str:
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


@dataclass(frozen=True)
class ModelCheckReport:
    """The model check of one prepared model (rows only; ``to_text`` renders them).

    Attributes:
        method: prepare method actually used (``fx`` / ``eager``).
        qat_mode: ``fuse_bn`` / ``with_bn`` / ``freeze_bn``.
        chip: chip checked against, or ``None``.
        fusable: modules of fusable groups left unfused.
        call_counts: call count of each float module.
        out_qconfigs: one row per op, graph order.
        weight_qconfigs: one row per op with a weight quant node.
        prompts: qconfigs to double-check.
        dtype_summary: one row per dtype (qint8, qint16, float16, float32).
        not_covered: what the eager fallback could not quantize.
        notes: prepare's remarks.
    """

    method: str
    qat_mode: str
    chip: str | None
    fusable: tuple[FusableRow, ...]
    call_counts: tuple[CallCountRow, ...]
    out_qconfigs: tuple[OutQconfigRow, ...]
    weight_qconfigs: tuple[WeightQconfigRow, ...]
    prompts: tuple[PromptRow, ...]
    dtype_summary: tuple[DtypeSummaryRow, ...]
    not_covered: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_text(self) -> str:
        """Render the report in the seed's ``model_check_result.txt`` layout."""
        parts = [
            f"Model check (method: {self.method}, qat_mode: {self.qat_mode}, chip: {self.chip or 'none'})"
        ]
        if self.fusable:
            rows = [(r.group, r.name, r.module_type) for r in self.fusable]
            parts.append(
                "Fusable modules are listed below:\n" + _table(rows, ("group", "name", "type"), "simple")
            )
        else:
            parts.append("Fusable modules are listed below:\nNone (every fusable group was fused).")
        rows_c = [(r.name, r.count, r.note) for r in self.call_counts]
        parts.append(
            "Each module called times:\n" + _table(rows_c, ("name", "called times", "note"), "simple")
        )
        headers = ("Module Name", "Module Type", "Input dtype", "out dtype", "ch_axis", "observer")
        rows_o = [
            (r.name, r.op_type, r.input_dtype, r.out_dtype, r.ch_axis, r.observer) for r in self.out_qconfigs
        ]
        parts.append("Each layer out qconfig:\n" + _table(rows_o, headers, "psql"))
        headers = ("Module Name", "Module Type", "weight dtype", "ch_axis", "observer")
        rows_w = [(r.name, r.op_type, r.weight_dtype, r.ch_axis, r.observer) for r in self.weight_qconfigs]
        parts.append("Weight qconfig:\n" + _table(rows_w, headers, "psql"))
        if self.prompts:
            rows_p = [(r.name, r.op_type, r.msg) for r in self.prompts]
            table = _table(rows_p, ("Module Name", "Module Type", "Msg"), "psql")
            parts.append("Please check if these OPs qconfigs are expected..\n" + table)
        else:
            parts.append("Please check if these OPs qconfigs are expected..\nNothing to check.")
        rows_s = [(r.dtype, r.ops, r.flops, f"{100.0 * r.flop_share:.2f}%") for r in self.dtype_summary]
        parts.append("Dtype summary:\n" + _table(rows_s, ("dtype", "ops", "flops", "flop share"), "simple"))
        if self.not_covered:
            parts.append("Not quantized (not seen by the eager fallback):\n" + "\n".join(self.not_covered))
        if self.notes:
            parts.append("Notes:\n" + "\n".join(self.notes))
        return "\n\n".join(parts) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_text` to ``path`` atomically (the old file stays intact if writing fails)."""
        _atomic_write_text(path, self.to_text())


# ---------------------------------------------------------------------------------------------------
# computing


def _widest(dtypes: Iterable[QuantDtype | None]) -> QuantDtype | None:
    known = [d for d in dtypes if d is not None]
    return max(known, key=precision_rank) if known else None


def _effective_inputs(
    info: OpInfo, nodes: Mapping[str, FakeQuantize], outputs: Mapping[str, QuantDtype | None]
) -> tuple[QuantDtype | None, ...]:
    """Dtype of each input: its input node's, or (float32 pass-through / no node) the producer's output."""
    count = max(len(info.input_producers), sum(k.startswith("input.") for k in nodes))
    result: list[QuantDtype | None] = []
    for i in range(count):
        node = nodes.get(f"input.{i}")
        own = node.dtype if node is not None else None
        if own is not None and own != float32:
            result.append(own)
            continue
        producer = info.input_producers[i] if i < len(info.input_producers) else None
        produced = outputs.get(producer) if producer is not None else None
        result.append(produced if produced is not None else own)
    return tuple(result)


def _scale_text(node: FakeQuantize) -> str:
    scale = node.scale.detach()
    if scale.numel() == 1:
        return repr(float(scale.reshape(())))
    return f"per-channel ({scale.numel()} values, max {float(scale.max())!r})"


def _op_prompts(
    info: OpInfo,
    nodes: Mapping[str, FakeQuantize],
    inputs: tuple[QuantDtype | None, ...],
    spec: ChipSpec | None,
) -> list[PromptRow]:
    rows: list[PromptRow] = []

    def add(msg: str) -> None:
        rows.append(PromptRow(info.name, info.op_type, msg))

    for point, node in nodes.items():
        if node.is_fixed:
            if node.dtype.is_integer:
                add(f"Fixed scale {_scale_text(node)} ({point}, {node.dtype})")
            else:
                add(f"Fixed scale set on a {node.dtype} {point}: it has no effect on a float node")
    output = nodes["output"].dtype if "output" in nodes else None
    if output is not None and precision_rank(output) > 0:
        add(f"High precision output {output}")
    if spec is not None and output is not None and output.is_float16 and not spec.fp16_fast:
        add(f"float16 on {spec.name} is slow (limited float compute): use it only where all-int16 fails")
    known = [d for d in inputs if d is not None]
    if info.kind == OpKind.OTHER and len(set(known)) > 1:
        add(
            f"Inputs have different dtypes ({', '.join(str(d or '-') for d in inputs)}): they are requantized"
        )
    if spec is not None:
        weight = nodes["weight"].dtype if "weight" in nodes else None
        for issue in chip_issues(info, inputs, weight, output, spec):
            if not issue.cascade:
                add(f"Not supported by {spec.name}: {issue.point} is {issue.before} ({issue.rule})")
    return rows


def _module_type(model: nn.Module, path: str) -> str:
    try:
        return type(model.get_submodule(path)).__name__
    except AttributeError:
        return "-"


def check_model(prepared: nn.Module, chip: str | None = None) -> ModelCheckReport:
    """Check a prepared model's structure and qconfigs (the seed's ``check_qat_model``).

    Args:
        prepared: a model returned by ``prepare`` (it carries ``prepare_record`` and op modules with
            ``op_info`` and quant nodes).
        chip: chip to check against; defaults to ``prepared.prepare_record.chip``.

    Returns:
        The report; ``report.to_text()`` renders it, ``report.write(path)`` saves it.

    Raises:
        ValueError: when ``prepared`` has neither a ``prepare_record`` nor quantized ops, or for an
            unknown chip.
    """
    record = getattr(prepared, "prepare_record", None)
    ops = list(iter_quant_ops(prepared))
    if not isinstance(record, PrepareRecord):
        if not ops:
            raise ValueError(
                "not a prepared model (no prepare_record, no quantized ops); call prepare() first"
            )
        record = PrepareRecord(method="unknown", qat_mode="unknown")
    chip = chip if chip is not None else record.chip
    spec = get_chip(chip) if chip is not None else None

    infos: list[OpInfo] = []
    all_nodes: dict[str, dict[str, FakeQuantize]] = {}
    for name, module in ops:
        info = getattr(module, "op_info", None)
        if not isinstance(info, OpInfo):
            info = OpInfo(name, type(module).__name__, OpKind.OTHER, name)
        infos.append(info)
        all_nodes[name] = quant_nodes_of(module)
    outputs = {n: (nodes["output"].dtype if "output" in nodes else None) for n, nodes in all_nodes.items()}

    out_rows: list[OutQconfigRow] = []
    weight_rows: list[WeightQconfigRow] = []
    prompts: list[PromptRow] = []
    summary: dict[str, list[int]] = {name: [0, 0] for name in DTYPES}
    for info in infos:
        nodes = all_nodes[info.name]
        inputs = _effective_inputs(info, nodes, outputs)
        if info.kind == OpKind.INPUT:
            in_text = "float32"
        else:
            in_text = ", ".join(str(d) if d is not None else "-" for d in inputs) or "-"
        out = nodes.get("output")
        if out is not None:
            axis = str(-1 if out.ch_axis is None else out.ch_axis)
            out_rows.append(
                OutQconfigRow(info.name, info.op_type, in_text, str(out.dtype), axis, out.observer_name)
            )
        else:
            out_rows.append(OutQconfigRow(info.name, info.op_type, in_text, "-", "-", "-"))
        weight = nodes.get("weight")
        if weight is not None:
            axis = str(-1 if weight.ch_axis is None else weight.ch_axis)
            weight_rows.append(
                WeightQconfigRow(info.name, info.op_type, str(weight.dtype), axis, weight.observer_name)
            )
        prompts.extend(_op_prompts(info, nodes, inputs, spec))
        if info.kind == OpKind.GEMM:
            compute = _widest([*inputs, weight.dtype if weight is not None else None])
        else:
            compute = outputs[info.name] or _widest(inputs)
        entry = summary[(compute or float32).name]
        entry[0] += 1
        entry[1] += int(info.flops)

    types = {i.name: i.op_type for i in infos}
    for line in record.changelog:
        name, _, rest = line.partition(":")
        prompts.append(PromptRow(name, types.get(name, "-"), f"Chip downgrade:{rest}"))

    total = sum(f for _, f in summary.values())
    return ModelCheckReport(
        method=record.method,
        qat_mode=record.qat_mode,
        chip=spec.name if spec is not None else None,
        fusable=tuple(
            FusableRow(g, path, _module_type(prepared, path))
            for g, group in enumerate(record.unfused)
            for path in group
        ),
        call_counts=tuple(
            CallCountRow(path, count, "never called" if count == 0 else "shared module" if count > 1 else "")
            for path, count in record.call_counts
        ),
        out_qconfigs=tuple(out_rows),
        weight_qconfigs=tuple(weight_rows),
        prompts=tuple(prompts),
        dtype_summary=tuple(
            DtypeSummaryRow(name, n, f, (f / total) if total else 0.0) for name, (n, f) in summary.items()
        ),
        not_covered=tuple(record.not_covered),
        notes=tuple(record.notes),
    )
