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
  widest of its effective inputs and weight, a ``float32`` pass-through input node counting as its
  producer's output dtype; another op's is its output dtype); ops prepare left without quant points
  (``PrepareRecord.float_ops``: functional ops eager mode cannot see, ops outside the ``jit_strip``
  region, ops run while a switch is disabled in ``forward``) count as float32. :func:`dtype_summary` and
  :func:`dtype_op_shares` give it without the rest of the check (the callbacks' ``quant/ratio_<dtype>``);
* **Not quantized**: those float32 ops with their FLOPs, share and reason, headed by their count and
  FLOPs share (also the ``quantized`` column of the out-qconfig table), so a partly float model is never
  reported as all-int8.

Computing (``check_model``, here) and rendering (``ModelCheckReport.to_text``, in
:mod:`.model_check_report`, whose names are re-exported here) are separate; ``write``
and :func:`write_changelog` write atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from qat_lightning.chips import ChipSpec, get_chip
from qat_lightning.quant.checks import require_module
from qat_lightning.quant.dtypes import DTYPES, QuantDtype, float32
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.ops import OpInfo, OpKind, PrepareRecord, iter_quant_ops, quant_nodes_of
from qat_lightning.quant.preparation.model_check_report import (
    CHANGELOG_FILENAME,
    MODEL_CHECK_FILENAME,
    CallCountRow,
    DtypeSummaryRow,
    FusableRow,
    ModelCheckReport,
    OutQconfigRow,
    PromptRow,
    WeightQconfigRow,
    write_changelog,
)
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
    "dtype_op_shares",
    "dtype_summary",
    "float_input_gemms",
    "not_quantized_share",
    "write_changelog",
]

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


def _op_table(
    prepared: nn.Module,
) -> tuple[PrepareRecord, list[OpInfo], dict[str, dict[str, FakeQuantize]], dict[str, QuantDtype | None]]:
    """Return the record (an empty one when missing), each op's info, its quant nodes and output dtype."""
    record = getattr(prepared, "prepare_record", None)
    if not isinstance(record, PrepareRecord):
        record = PrepareRecord(method="unknown", qat_mode="unknown")
    infos: list[OpInfo] = []
    all_nodes: dict[str, dict[str, FakeQuantize]] = {}
    for name, module in iter_quant_ops(prepared):
        info = getattr(module, "op_info", None)
        if not isinstance(info, OpInfo):
            info = OpInfo(name, type(module).__name__, OpKind.OTHER, name)
        infos.append(info)
        all_nodes[name] = quant_nodes_of(module)
    outputs = {n: (nodes["output"].dtype if "output" in nodes else None) for n, nodes in all_nodes.items()}
    return record, infos, all_nodes, outputs


def _compute_dtype(
    info: OpInfo, nodes: Mapping[str, FakeQuantize], outputs: Mapping[str, QuantDtype | None]
) -> QuantDtype:
    """Return the dtype one quantized op computes in: the dtype summary's rule (module docstring)."""
    inputs = _effective_inputs(info, nodes, outputs)
    if info.kind == OpKind.GEMM:
        weight = nodes.get("weight")
        compute = _widest([*inputs, weight.dtype if weight is not None else None])
    else:
        compute = outputs.get(info.name) or _widest(inputs)
    return compute or float32


def _summary(
    record: PrepareRecord,
    infos: Iterable[OpInfo],
    all_nodes: Mapping[str, Mapping[str, FakeQuantize]],
    outputs: Mapping[str, QuantDtype | None],
) -> tuple[DtypeSummaryRow, ...]:
    """Count ops and FLOPs per compute dtype; the ops of ``record.float_ops`` count as float32."""
    summary: dict[str, list[int]] = {name: [0, 0] for name in DTYPES}
    floats = {op.name for op in record.float_ops}
    planned: set[str] = set()
    for info in infos:
        planned.add(info.name)
        dtype = float32 if info.name in floats else _compute_dtype(info, all_nodes[info.name], outputs)
        summary[dtype.name][0] += 1
        summary[dtype.name][1] += int(info.flops)
    for op in record.float_ops:
        if op.name not in planned:
            summary[float32.name][0] += 1
            summary[float32.name][1] += int(op.flops)
    total = sum(f for _, f in summary.values())
    return tuple(
        DtypeSummaryRow(name, n, f, (f / total) if total else 0.0) for name, (n, f) in summary.items()
    )


def dtype_summary(prepared: nn.Module) -> tuple[DtypeSummaryRow, ...]:
    """Return the ops and FLOPs per compute dtype of ``prepared``: ``check_model(prepared).dtype_summary``.

    An op computes in one dtype: a gemm in the widest of its effective inputs (a ``float32``
    pass-through input node takes its producer's output dtype) and its weight, another op in its output
    dtype; ops prepare left without quant points (``prepare_record.float_ops``) count as float32.

    Args:
        prepared: a prepared model (any module: one without ops or record gives all-zero rows).

    Returns:
        One row per dtype, in ``qint8``, ``qint16``, ``float16``, ``float32`` order.
    """
    return _summary(*_op_table(prepared))


def dtype_op_shares(prepared: nn.Module) -> dict[str, float]:
    """Return the share (0..1) of ops per compute dtype, as counted by :func:`dtype_summary`.

    Args:
        prepared: a prepared model.

    Returns:
        ``{"qint8": ..., "qint16": ..., "float16": ..., "float32": ...}`` summing to 1, or ``{}`` when
        ``prepared`` has neither quantized ops nor recorded float ops.
    """
    rows = dtype_summary(prepared)
    total = sum(r.ops for r in rows)
    return {r.dtype: r.ops / total for r in rows} if total else {}


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


def float_input_gemms(prepared: nn.Module) -> list[OpInfo]:
    """Return the gemm ops of ``prepared`` with an input that is effectively float32 (no chip runs them).

    Such an input has a float32 (pass-through) input node and comes from no quantized op: an op prepare
    left float, an opaque module, a lookup table.
    """
    ops = [(getattr(m, "op_info", None), quant_nodes_of(m)) for _, m in iter_quant_ops(prepared)]
    outputs = {
        i.name: (n["output"].dtype if "output" in n else None) for i, n in ops if isinstance(i, OpInfo)
    }
    found = []
    for info, nodes in ops:
        if isinstance(info, OpInfo) and info.kind == OpKind.GEMM:
            if any(d is not None and d == float32 for d in _effective_inputs(info, nodes, outputs)):
                found.append(info)
    return found


def not_quantized_share(prepared: nn.Module) -> tuple[int, float]:
    """Return ``(ops, share of all FLOPs)`` that ``prepared`` computes in float32 although it is prepared.

    Counted: the ops prepare left without quant points (``prepare_record.float_ops``, also those run
    while a switch is off in ``forward``) and the gemms they feed (:func:`float_input_gemms`, a float32
    input makes a float32 gemm). All FLOPs = the quantized ops' plus the unquantized ones'. A model
    without a ``prepare_record`` has none recorded.
    """
    record = getattr(prepared, "prepare_record", None)
    quantized = {name: int(op.op_info.flops) for name, op in iter_quant_ops(prepared)}
    floats = {op.name: int(op.flops) for op in getattr(record, "float_ops", ())}
    floats.update({info.name: int(info.flops) for info in float_input_gemms(prepared)})
    total = sum(quantized.values()) + sum(f for name, f in floats.items() if name not in quantized)
    return len(floats), (sum(floats.values()) / total if total else 0.0)


def check_model(prepared: nn.Module, chip: str | None = None) -> ModelCheckReport:
    """Check a prepared model's structure and qconfigs (the seed's ``check_qat_model``).

    Args:
        prepared: a model returned by ``prepare`` (it carries ``prepare_record`` and op modules with
            ``op_info`` and quant nodes).
        chip: chip to check against; defaults to ``prepared.prepare_record.chip``.

    Returns:
        The report; ``report.to_text()`` renders it, ``report.write(path)`` saves it.

    Raises:
        TypeError: when ``prepared`` is not a module.
        ValueError: when ``prepared`` has neither a ``prepare_record`` nor quantized ops, or for an
            unknown chip.
    """
    require_module(prepared, "check_model", "prepared")
    record, infos, all_nodes, outputs = _op_table(prepared)
    if not infos and not isinstance(getattr(prepared, "prepare_record", None), PrepareRecord):
        raise ValueError("not a prepared model (no prepare_record, no quantized ops); call prepare() first")
    chip = chip if chip is not None else record.chip
    spec = get_chip(chip) if chip is not None else None

    out_rows: list[OutQconfigRow] = []
    weight_rows: list[WeightQconfigRow] = []
    prompts: list[PromptRow] = []
    floats = {op.name: op for op in record.float_ops}
    for info in infos:
        nodes = all_nodes[info.name]
        inputs = _effective_inputs(info, nodes, outputs)
        if info.kind == OpKind.INPUT:
            in_text = "float32"
        else:
            in_text = ", ".join(str(d) if d is not None else "-" for d in inputs) or "-"
        out = nodes.get("output")
        quantized = "yes" if info.name not in floats else f"no: {floats[info.name].reason}"
        if out is not None:
            axis = str(-1 if out.ch_axis is None else out.ch_axis)
            out_rows.append(
                OutQconfigRow(
                    info.name, info.op_type, in_text, str(out.dtype), axis, out.observer_name, quantized
                )
            )
        else:
            out_rows.append(OutQconfigRow(info.name, info.op_type, in_text, "-", "-", "-", quantized))
        weight = nodes.get("weight")
        if weight is not None:
            axis = str(-1 if weight.ch_axis is None else weight.ch_axis)
            weight_rows.append(
                WeightQconfigRow(info.name, info.op_type, str(weight.dtype), axis, weight.observer_name)
            )
        prompts.extend(_op_prompts(info, nodes, inputs, spec))
    planned = {i.name for i in infos}
    for op in record.float_ops:
        if op.name not in planned:
            out_rows.append(
                OutQconfigRow(op.name, op.op_type, "float32", "float32", "-", "-", f"no: {op.reason}")
            )

    types = {i.name: i.op_type for i in infos}
    for line in record.changelog:
        name, _, rest = line.partition(":")
        prompts.append(PromptRow(name, types.get(name, "-"), f"Chip downgrade:{rest}"))

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
        dtype_summary=_summary(record, infos, all_nodes, outputs),
        not_covered=tuple(record.not_covered),
        notes=tuple(record.notes),
        float_ops=tuple(record.float_ops),
    )
