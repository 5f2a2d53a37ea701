"""The rows of the model check and their rendering: :class:`ModelCheckReport` (``model_check_result.txt``).

Computing lives in :mod:`.model_check` (``check_model``); this module holds the
result (frozen rows) and renders it in the seed's layout. ``write`` and :func:`write_changelog` write
atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tabulate import tabulate

from qat_lightning.files import write_atomic
from qat_lightning.quant.ops import FloatOp

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
    quantized: str = "yes"


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


def write_changelog(path: str | os.PathLike[str], lines: Iterable[str]) -> None:
    """Write chip downgrades (``QconfigAssignment.changelog``) one per line, atomically.

    Args:
        path: the file, usually ``<check_dir>/qconfig_changelog.txt``.
        lines: the changelog lines (an empty changelog writes an empty file).
    """
    lines = list(lines)
    write_atomic(path, "".join(f"{line}\n" for line in lines))


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
        float_ops: ops left computing in float32 (not quantized), see ``PrepareRecord.float_ops``.
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
    float_ops: tuple[FloatOp, ...] = ()

    @property
    def float_flop_share(self) -> float:
        """Share (0..1) of all FLOPs computed in float32 by ops without quant points."""
        total = sum(r.flops for r in self.dtype_summary)
        return sum(op.flops for op in self.float_ops) / total if total else 0.0

    def _float_section(self) -> str:
        fp32 = next((r for r in self.dtype_summary if r.dtype == "float32"), None)
        head = (
            f"Not quantized (float32): {len(self.float_ops)} op(s) without quant points, "
            f"{100.0 * self.float_flop_share:.2f}% of FLOPs"
        )
        if fp32 is not None and fp32.ops:
            head += (
                f"; float32 compute in all: {fp32.ops} op(s), {100.0 * fp32.flop_share:.2f}% of FLOPs "
                "(ops fed by unquantized outputs included)"
            )
        if not self.float_ops:
            return head
        total = sum(r.flops for r in self.dtype_summary) or 1
        rows = [
            (o.name, o.op_type, o.flops, f"{100.0 * o.flops / total:.2f}%", o.reason) for o in self.float_ops
        ]
        return head + "\n" + _table(rows, ("name", "type", "flops", "flop share", "reason"), "simple")

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
        headers = (
            "Module Name",
            "Module Type",
            "Input dtype",
            "out dtype",
            "ch_axis",
            "observer",
            "quantized",
        )
        rows_o = [
            (r.name, r.op_type, r.input_dtype, r.out_dtype, r.ch_axis, r.observer, r.quantized)
            for r in self.out_qconfigs
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
        parts.append(self._float_section())
        if self.notes:
            parts.append("Notes:\n" + "\n".join(self.notes))
        return "\n\n".join(parts) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_text` to ``path`` atomically (the old file stays intact if writing fails)."""
        write_atomic(path, self.to_text())
