"""Qconfig templates: rules that turn a reference :class:`QConfig` into one QConfig per op.

A template changes only the QConfig fields it names; ``QconfigSetter`` (``setter.py``) applies
templates in stages (see its module docstring for the full precedence rule):

* stage ``TYPE`` (:class:`ConvDtypeTemplate`, :class:`MatmulDtypeTemplate`): rules by op type;
* stage ``NAME`` (:class:`ModuleNameTemplate`): rules by op name, applied after every type rule, so an
  explicit name beats a type rule wherever each sits in the list;
* stage ``RAISE`` (:class:`SensitivityTemplate`): only raises precision, applied last.

Precision order used by "raise": ``qint8 < qint16 < float16 < float32``.

Op names are matched by :func:`~qat_lightning.quant.op_names.match_name`, on path components: the prefix
``head`` matches ``head``, ``head.cls`` and ``head#1`` (the second call site of a shared ``head``) but not
``header``; ``""`` matches every op; a glob (``"*.fc"``) is matched against the whole name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any, ClassVar

from qat_lightning.quant.dtypes import DtypeLike, QuantDtype, float32, parse_dtype, qint8, qint16
from qat_lightning.quant.op_names import match_name, match_order
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.qconfig.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.sensitivity_table import SENSITIVE_TYPES, SensitivityTable

__all__ = [
    "PRECISION_ORDER",
    "Template",
    "ConvDtypeTemplate",
    "MatmulDtypeTemplate",
    "ModuleNameTemplate",
    "SensitivityTemplate",
    "precision_rank",
    "effective_input_dtypes",
]

#: Dtype names from lowest to highest precision (what "raise" means).
PRECISION_ORDER: tuple[str, ...] = ("qint8", "qint16", "float16", "float32")

NAME_DICT_KEYS = (
    "dtype",
    "output_dtype",
    "input_dtype",
    "weight_dtype",
    "threshold",
    "fixed_scale",
    "observer",
)


def precision_rank(dtype: QuantDtype | None) -> int:
    """Position of ``dtype`` in :data:`PRECISION_ORDER` (``-1`` for ``None``)."""
    return -1 if dtype is None else PRECISION_ORDER.index(dtype.name)


def _is_gemm(op: OpInfo) -> bool:
    return op.kind == OpKind.GEMM


def _num_inputs(op: OpInfo) -> int:
    if _is_gemm(op):
        return max(len(op.input_producers), 2 if op.is_matmul else 1)
    return len(op.input_producers)


def effective_input_dtypes(op: OpInfo, qconfigs: Mapping[str, QConfig]) -> tuple[QuantDtype | None, ...]:
    """Return the dtype each input of ``op`` really has under ``qconfigs``.

    A gemm input set to a dtype has that dtype; an input left as produced (``None``, or ``float32``,
    which prepare realises as a pass-through node) has its producer op's output dtype. Non-gemm ops
    have no input quant points: their inputs are their producers' outputs. ``None`` = unknown (no
    quantized producer).
    """
    qconfig = qconfigs[op.name]
    result: list[QuantDtype | None] = []
    for i in range(_num_inputs(op)):
        own = qconfig.input_dtype_at(i) if _is_gemm(op) else None
        if own is not None and own != float32:
            result.append(own)
            continue
        producer = op.input_producers[i] if i < len(op.input_producers) else None
        produced = qconfigs[producer].output_dtype if producer in qconfigs else None
        result.append(produced if produced is not None else own)
    return tuple(result)


class Template(ABC):
    """A rule that edits the QConfigs of some ops (see the module docstring for the stages)."""

    TYPE: ClassVar[int] = 0
    NAME: ClassVar[int] = 1
    RAISE: ClassVar[int] = 2
    stage: ClassVar[int]

    @abstractmethod
    def apply(self, ops: Sequence[OpInfo], qconfigs: dict[str, QConfig]) -> None:
        """Edit ``qconfigs`` (op name -> QConfig, every op present) in place."""

    def unmatched(self, ops: Sequence[OpInfo]) -> tuple[str, ...]:
        """Names this template refers to that match no op (type rules: none)."""
        return ()


def _dtype(value: DtypeLike) -> QuantDtype:
    """``parse_dtype`` without the integer buffer codes (a user never means ``3`` as a dtype)."""
    if isinstance(value, (int, float)):
        raise ValueError(f"unknown quantization dtype {value!r}; allowed: {', '.join(PRECISION_ORDER)}")
    return parse_dtype(value)


def _optional(value: DtypeLike | None) -> QuantDtype | None:
    return None if value is None else _dtype(value)


@dataclass(frozen=True)
class ConvDtypeTemplate(Template):
    """Input (activation) and weight dtype of every conv / conv-transpose / linear (non-matmul gemm).

    Args:
        input_dtype: activation input dtype, ``None`` to leave it unchanged.
        weight_dtype: weight dtype, ``None`` to leave it unchanged.

    Raises:
        ValueError: for an unknown dtype, or when both are ``None``.
    """

    input_dtype: DtypeLike | None = None
    weight_dtype: DtypeLike | None = None
    stage: ClassVar[int] = Template.TYPE

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_dtype", _optional(self.input_dtype))
        object.__setattr__(self, "weight_dtype", _optional(self.weight_dtype))
        if self.input_dtype is None and self.weight_dtype is None:
            raise ValueError("ConvDtypeTemplate needs input_dtype and/or weight_dtype (qint8, qint16, ...)")

    def apply(self, ops: Sequence[OpInfo], qconfigs: dict[str, QConfig]) -> None:
        """Set the input/weight dtype of every non-matmul gemm op."""
        patch = {
            k: v
            for k, v in (("input_dtype", self.input_dtype), ("weight_dtype", self.weight_dtype))
            if v is not None
        }
        for op in ops:
            if _is_gemm(op) and not op.is_matmul:
                qconfigs[op.name] = qconfigs[op.name].replace(**patch)


@dataclass(frozen=True)
class MatmulDtypeTemplate(Template):
    """Dtypes of the two activation inputs of every matmul / bmm / ``@`` op.

    Args:
        input_dtypes: one dtype for both inputs, or a pair ``(first, second)``.

    Raises:
        ValueError: for an unknown dtype or a sequence that is not a pair.
    """

    input_dtypes: DtypeLike | Sequence[DtypeLike] = qint8
    stage: ClassVar[int] = Template.TYPE

    def __post_init__(self) -> None:
        value = self.input_dtypes
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"input_dtypes must be one dtype or a pair (first, second), got {value!r}")
            pair = (_dtype(value[0]), _dtype(value[1]))
        else:
            pair = (_dtype(value), _dtype(value))  # type: ignore[arg-type]
        object.__setattr__(self, "input_dtypes", pair)

    def apply(self, ops: Sequence[OpInfo], qconfigs: dict[str, QConfig]) -> None:
        """Set the per-input dtypes of every matmul op."""
        for op in ops:
            if _is_gemm(op) and op.is_matmul:
                qconfigs[op.name] = qconfigs[op.name].replace(input_dtype=tuple(self.input_dtypes))


def _name_patch(key: str, value: Any) -> dict[str, Any]:
    """Turn one ModuleNameTemplate value into the QConfig fields it sets."""
    if isinstance(value, QConfig):
        return {f.name: getattr(value, f.name) for f in fields(QConfig)}
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in NAME_DICT_KEYS]
        if unknown:
            raise ValueError(f"{key!r}: unknown keys {unknown}; allowed: {', '.join(NAME_DICT_KEYS)}")
        if "dtype" in value and "output_dtype" in value:
            raise ValueError(f"{key!r}: give 'dtype' or 'output_dtype', not both")
        patch: dict[str, Any] = {}
        out_key = "dtype" if "dtype" in value else "output_dtype"
        if out_key in value:
            patch["output_dtype"] = _optional(value[out_key])
        if "input_dtype" in value:
            raw = value["input_dtype"]
            patch["input_dtype"] = (
                tuple(_optional(d) for d in raw) if isinstance(raw, (tuple, list)) else _optional(raw)
            )
        if "weight_dtype" in value:
            patch["weight_dtype"] = _optional(value["weight_dtype"])
        if "observer" in value:
            patch["observer"] = value["observer"]
            if "threshold" not in value and "fixed_scale" not in value:
                patch["fixed_threshold"] = None  # an observer asked for here beats an inherited threshold
        if "threshold" in value and "fixed_scale" in value:
            raise ValueError(f"{key!r}: give 'threshold' or 'fixed_scale', not both")
        if "threshold" in value:
            patch["fixed_threshold"] = _positive(key, "threshold", value["threshold"])
        if "fixed_scale" in value:
            out = patch.get("output_dtype")
            if out is None or not out.is_integer:
                raise ValueError(
                    f"{key!r}: 'fixed_scale' needs an integer 'dtype' in the same dict; or use 'threshold'"
                )
            patch["fixed_threshold"] = _positive(key, "fixed_scale", value["fixed_scale"]) * out.qmax
        get_qconfig().replace(**patch)  # validate observer names etc. now, not at assign time
        return patch
    try:
        return {"output_dtype": _dtype(value)}
    except ValueError:
        raise ValueError(
            f"{key!r}: unsupported value {value!r}; allowed: a dtype (qint8, qint16, float16, float32, "
            f"torch.float16), a QConfig, or a dict with keys {', '.join(NAME_DICT_KEYS)}"
        ) from None


def _positive(key: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 or math.isinf(value):
        raise ValueError(f"{key!r}: {what} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ModuleNameTemplate(Template):
    """QConfig by op-name prefix: ``{"": float16, "head.cls": qint16, "speed_quant": {"threshold": 200.0}}``.

    Values:
        * a dtype (``qint8``, ``"qint16"``, ``torch.float16``, ...): sets the op's **output** dtype only,
          for every kind of op (a gemm's input and weight dtypes are left to the type templates; its
          consumers see the new output dtype). This is the seed's ``ModuleNameTemplate({"": torch.float16})``
          = "all ops float16 output";
        * a full :class:`QConfig` (``get_qconfig(...)``): sets every field;
        * a dict with keys among ``dtype``/``output_dtype``, ``input_dtype`` (a dtype or a per-input tuple),
          ``weight_dtype``, ``observer``, ``threshold`` (fixed range, ``scale = threshold / qmax``) and
          ``fixed_scale`` (needs an integer ``dtype`` in the same dict): sets exactly those fields, except
          that ``observer`` without ``threshold``/``fixed_scale`` also clears a threshold set before (by a
          shorter prefix, an earlier template or the reference qconfig): the op's output is calibrated
          with that observer. A threshold fixes the op's output scale only; its inputs keep the observer.

    Every prefix matching an op applies, from the shortest to the longest, so the most specific prefix
    wins on a field that several set (``{"": {"threshold": 10.0}, "fc": {"observer": "kl"}}``: ``fc``'s
    output is calibrated with ``kl``, every other op's output is fixed to ``10 / qmax``).

    Raises:
        ValueError: for a non-string key or an unsupported value (the message lists what is accepted).
    """

    mapping: Mapping[str, Any] = field(default_factory=dict)
    stage: ClassVar[int] = Template.NAME

    def __post_init__(self) -> None:
        if not isinstance(self.mapping, Mapping):
            raise TypeError(
                f"ModuleNameTemplate takes a mapping of op-name prefix -> qconfig, got {self.mapping!r}"
            )
        patches: dict[str, dict[str, Any]] = {}
        for key, value in self.mapping.items():
            if not isinstance(key, str):
                raise ValueError(f"op-name prefixes must be strings, got {key!r}")
            patches[key] = _name_patch(key, value)
        object.__setattr__(self, "mapping", dict(self.mapping))
        object.__setattr__(self, "_patches", [(k, patches[k]) for k in match_order(patches)])

    def apply(self, ops: Sequence[OpInfo], qconfigs: dict[str, QConfig]) -> None:
        """Apply every matching prefix to each op, shortest first."""
        for op in ops:
            for prefix, patch in self._patches:  # type: ignore[attr-defined]
                if match_name(prefix, op.name):
                    qconfigs[op.name] = qconfigs[op.name].replace(**patch)

    def unmatched(self, ops: Sequence[OpInfo]) -> tuple[str, ...]:
        """Prefixes that match no op."""
        return tuple(k for k in self.mapping if not any(match_name(k, op.name) for op in ops))


@dataclass(frozen=True)
class SensitivityTemplate(Template):
    """Raise the most sensitive ops of one or more sensitivity tables to ``high_dtype``.

    The selected rows are the union over tables of ``table.top(topk_or_ratio, sensitive_type)``. For an
    ``activation`` row the op's output dtype (and, for a gemm, the dtype of every input whose effective
    dtype is lower) is raised; for a ``weight`` row the gemm's weight dtype is raised. It only raises:
    an op already at or above ``high_dtype`` (e.g. float16 with ``high_dtype=qint16``) is left as is,
    and a missing quant point (``None``) stays missing.

    Args:
        table: a :class:`SensitivityTable` or a sequence of them.
        topk_or_ratio: ``>= 1``: that many rows per table; ``[0, 1)``: that share of each table's rows.
        sensitive_type: only rows of this type (``activation`` / ``weight``), or ``None`` for all.
        high_dtype: the dtype to raise to (``qint16``, ``float16`` or ``float32``).

    Raises:
        ValueError: for a bad table, a negative or fractional count, an unknown type or dtype.
    """

    table: SensitivityTable | Sequence[SensitivityTable]
    topk_or_ratio: float = 0.2
    sensitive_type: str | None = None
    high_dtype: DtypeLike = qint16
    stage: ClassVar[int] = Template.RAISE

    def __post_init__(self) -> None:
        tables = (self.table,) if isinstance(self.table, SensitivityTable) else self.table
        if not isinstance(tables, (tuple, list)) or not tables:
            raise ValueError(
                f"table must be a SensitivityTable or a non-empty list of them, got {self.table!r}"
            )
        for t in tables:
            if not isinstance(t, SensitivityTable):
                raise ValueError(f"table entries must be SensitivityTable, got {type(t).__name__}")
        object.__setattr__(self, "table", tuple(tables))
        k = self.topk_or_ratio
        if isinstance(k, bool) or not isinstance(k, Real) or not k >= 0 or (k >= 1 and k != int(k)):
            raise ValueError(f"topk_or_ratio must be a count >= 1 or a ratio in [0, 1), got {k!r}")
        if self.sensitive_type is not None and self.sensitive_type not in SENSITIVE_TYPES:
            raise ValueError(
                f"unknown sensitive_type {self.sensitive_type!r}; allowed: None, {', '.join(SENSITIVE_TYPES)}"
            )
        high = _dtype(self.high_dtype)
        if high == qint8:
            raise ValueError("high_dtype must be higher than qint8; allowed: qint16, float16, float32")
        object.__setattr__(self, "high_dtype", high)

    def selected(self) -> tuple[tuple[str, str], ...]:
        """Return the ``(op_name, sensitive_type)`` pairs to raise: the union over tables, in table order."""
        seen: dict[tuple[str, str], None] = {}
        for t in self.table:  # type: ignore[union-attr]
            for row in t.top(self.topk_or_ratio, self.sensitive_type):
                seen.setdefault((row.op_name, row.sensitive_type), None)
        return tuple(seen)

    def _raise(self, dtype: QuantDtype | None) -> QuantDtype | None:
        high: QuantDtype = self.high_dtype  # type: ignore[assignment]
        return dtype if dtype is None or precision_rank(dtype) >= precision_rank(high) else high

    def apply(self, ops: Sequence[OpInfo], qconfigs: dict[str, QConfig]) -> None:
        """Raise the selected ops' dtypes (never lowers anything).

        Outputs and weights are raised first, then gemm inputs, so a gemm input is set explicitly only
        when its producer's (possibly just raised) output is still below ``high_dtype``; the result does
        not depend on the row order.
        """
        by_name = {op.name: op for op in ops}
        bad = [(n, kind) for n, kind in self.selected() if kind not in SENSITIVE_TYPES]
        if bad:  # rows check their type; this guards rows changed after construction
            raise ValueError(
                f"sensitivity rows {bad} have an unknown type; allowed: {', '.join(SENSITIVE_TYPES)}"
            )
        selected = [(by_name[n], kind) for n, kind in self.selected() if n in by_name]
        for op, kind in selected:
            qconfig = qconfigs[op.name]
            if kind == "activation":
                qconfigs[op.name] = qconfig.replace(output_dtype=self._raise(qconfig.output_dtype))
            elif kind == "weight" and _is_gemm(op) and not op.is_matmul:
                qconfigs[op.name] = qconfig.replace(weight_dtype=self._raise(qconfig.weight_dtype))
        high_rank = precision_rank(self.high_dtype)  # type: ignore[arg-type]
        for op, kind in selected:
            if kind != "activation" or not _is_gemm(op):
                continue
            qconfig = qconfigs[op.name]
            effective = effective_input_dtypes(op, qconfigs)
            new = [
                self.high_dtype
                if eff is None or precision_rank(eff) < high_rank
                else qconfig.input_dtype_at(i)
                for i, eff in enumerate(effective)
            ]
            qconfigs[op.name] = qconfig.replace(input_dtype=tuple(new) if len(new) > 1 else new[0])

    def unmatched(self, ops: Sequence[OpInfo]) -> tuple[str, ...]:
        """Return selected op names that are not ops of this model (a table of another model or version)."""
        names = {op.name for op in ops}
        return tuple(dict.fromkeys(n for n, _ in self.selected() if n not in names))
