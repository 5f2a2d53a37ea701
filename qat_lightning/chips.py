"""What each target chip supports, and what each op costs in each dtype (data plus tiny lookups).

Capabilities (``DESIGN.md``, from the seed's J6E/M and J6P mixed-precision sections):

=========  ==========================================  ==============================================
chip       gemm (conv, linear, matmul)                 non-gemm ops
=========  ==========================================  ==============================================
j6e, j6m   qint8 or qint16 per input, but not qint16   qint8, qint16; float16 possible but slow
           on both activation and weight
j6p        qint8 or qint16 on both ("double int16")    float16 by default; float32 for a few (sigmoid)
=========  ==========================================  ==============================================

No chip runs a float16 gemm: gemm inputs are always qint8/qint16 (a gemm *output* may be float16).

Cost model: ``op_cost = flops * factor``, ``flops`` being the op's multiply-accumulates (one per output
element for elementwise ops, ``OpInfo.flops``). The factors are relative throughput costs, kept as data
in :data:`GEMM_OPERAND_FACTORS` and :data:`ELEMENT_FACTORS`:

* gemm, both operands integer: the product of the per-operand factors (qint8 = 1, qint16 = 2), so
  qint8 x qint8 = 1, one qint16 operand = 2, double qint16 = 4;
* non-gemm: the largest factor among its given dtypes: qint8 = 1, qint16 = 2, float16 = 4 on a chip
  with fast float16 (j6p) or 8 otherwise (j6e/j6m), float32 = 16;
* a gemm with a float operand (which no chip supports; the chip rules reject it) is priced as a
  float op (largest float factor);
* a dtype given as ``None`` (no quant point / unknown) is left out; with no dtype at all the factor is 1.

This module is data: it never imports the ``quant`` layer. Dtypes are compared by name
(``"qint8"``, ``"qint16"``, ``"float16"``, ``"float32"``); ``QuantDtype`` objects, their names and
``torch.float16`` / ``torch.float32`` are all accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps chips.py free of quant imports at runtime
    from qat_lightning.quant.ops import OpInfo
    from qat_lightning.quant.qconfig.setter import QconfigAssignment

__all__ = [
    "ChipSpec",
    "CHIPS",
    "GEMM_OPERAND_FACTORS",
    "ELEMENT_FACTORS",
    "get_chip",
    "dtype_name",
    "dtype_factor",
    "op_cost",
    "op_costs",
    "model_cost",
]


@dataclass(frozen=True)
class ChipSpec:
    """Capabilities of one target chip.

    Attributes:
        name: chip name (``j6e``, ``j6m``, ``j6p``).
        gemm_input_dtypes: dtypes a gemm's activation and weight inputs may have.
        gemm_double_int16: whether a gemm may take qint16 on both activation and weight (both inputs of
            a matmul).
        other_dtypes: dtypes non-gemm ops (and gemm outputs) may produce; ``float32`` only for the op
            types in ``fp32_ops``.
        fp16_fast: whether float16 runs at full speed (else it is possible but slow).
        fp32_ops: lower-case op types that may run in float32 (non-linear ops whose input scaling
            cannot be undone).
        notes: the seed's tuning advice for this chip.
    """

    name: str
    gemm_input_dtypes: tuple[str, ...]
    gemm_double_int16: bool
    other_dtypes: tuple[str, ...]
    fp16_fast: bool
    fp32_ops: tuple[str, ...]
    notes: str

    def allows_output(self, dtype: Any, op_type: str) -> bool:
        """Whether an op of ``op_type`` may produce ``dtype`` on this chip (``None`` always may)."""
        name = dtype_name(dtype)
        if name is None:
            return True
        if name == "float32":
            return "float32" in self.other_dtypes and op_type.lower() in self.fp32_ops
        return name in self.other_dtypes

    def allows_gemm_input(self, dtype: Any) -> bool:
        """Whether a gemm input (activation or weight) may have ``dtype`` (``None`` = unknown: yes)."""
        name = dtype_name(dtype)
        return name is None or name in self.gemm_input_dtypes


_INT = ("qint8", "qint16")
_J6EM_NOTES = "prefer int8/int16 mixing; add fp16 only where all-int16 fails (fp16 is slow)"
CHIPS: dict[str, ChipSpec] = {
    "j6e": ChipSpec("j6e", _INT, False, ("qint8", "qint16", "float16"), False, (), _J6EM_NOTES),
    "j6m": ChipSpec("j6m", _INT, False, ("qint8", "qint16", "float16"), False, (), _J6EM_NOTES),
    "j6p": ChipSpec(
        "j6p",
        _INT,
        True,
        ("qint8", "qint16", "float16", "float32"),
        True,
        ("sigmoid", "tanh", "exp", "log", "softmax"),
        "non-gemm ops in fp16 by default; tune the gemm int8/int16 ratio; fp32 only for a few ops",
    ),
}

#: Per-operand factor of an integer gemm; the op's factor is the product over its two operands.
GEMM_OPERAND_FACTORS: dict[str, float] = {"qint8": 1.0, "qint16": 2.0}

#: Factor of a non-gemm op by dtype; ``float16`` has a fast (``fp16_fast``) and a slow price.
ELEMENT_FACTORS: dict[str, float] = {
    "qint8": 1.0,
    "qint16": 2.0,
    "float16_fast": 4.0,
    "float16_slow": 8.0,
    "float32": 16.0,
}

_ALIASES = {
    "torch.float16": "float16",
    "torch.half": "float16",
    "torch.float32": "float32",
    "torch.float": "float32",
    "int8": "qint8",
    "int16": "qint16",
    "fp16": "float16",
    "fp32": "float32",
}


def get_chip(chip: str | ChipSpec) -> ChipSpec:
    """Look a chip up by name (case-insensitive); a :class:`ChipSpec` is returned as is.

    Raises:
        ValueError: for an unknown name; the message lists the known chips.
    """
    if isinstance(chip, ChipSpec):
        return chip
    key = chip.strip().lower() if isinstance(chip, str) else None
    if key not in CHIPS:
        raise ValueError(f"unknown chip {chip!r}; known chips: {', '.join(CHIPS)}")
    return CHIPS[key]


def dtype_name(dtype: Any) -> str | None:
    """Return the canonical name of a dtype (``QuantDtype``, name, ``torch.float16``), or ``None``."""
    if dtype is None:
        return None
    name = getattr(dtype, "name", None)
    if isinstance(name, str) and not str(dtype).startswith("torch."):
        return name
    text = str(dtype).strip().lower()
    return _ALIASES.get(text, text)


def dtype_factor(dtype: Any, chip: str | ChipSpec) -> float:
    """Return the non-gemm cost factor of ``dtype`` on ``chip`` (see the module docstring)."""
    name = dtype_name(dtype)
    if name == "float16":
        return ELEMENT_FACTORS["float16_fast" if get_chip(chip).fp16_fast else "float16_slow"]
    if name not in ELEMENT_FACTORS:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: qint8, qint16, float16, float32")
    return ELEMENT_FACTORS[name]


def op_cost(
    flops: float,
    input_dtype: Any,
    weight_dtype: Any,
    output_dtype: Any,
    chip: str | ChipSpec,
    is_gemm: bool,
) -> float:
    """Relative cost of one op: ``flops`` times the dtype factor (see the module docstring).

    Args:
        flops: the op's multiply-accumulates (``OpInfo.flops``).
        input_dtype: activation input dtype (for a matmul: its first input), ``None`` if unknown.
        weight_dtype: weight dtype of a gemm (for a matmul: its second input), ``None`` if none.
        output_dtype: output dtype, ``None`` if the op has no output quant point.
        chip: chip name or spec (decides the float16 price).
        is_gemm: conv / linear / matmul (priced by its operands) or not (priced by its widest dtype).

    Returns:
        ``flops * factor``.
    """
    spec = get_chip(chip)
    operands = [d for d in (input_dtype, weight_dtype) if d is not None]
    if is_gemm and operands:
        names = [dtype_name(d) for d in operands]
        if all(n in GEMM_OPERAND_FACTORS for n in names):
            factor = 1.0
            for n in names:
                factor *= GEMM_OPERAND_FACTORS[n]
            return float(flops) * factor
        return float(flops) * max(dtype_factor(d, spec) for d in operands if dtype_name(d) not in _INT)
    given = [d for d in (input_dtype, weight_dtype, output_dtype) if d is not None]
    factor = max((dtype_factor(d, spec) for d in given), default=1.0)
    return float(flops) * factor


def _widest(dtypes: Iterable[Any], chip: ChipSpec) -> Any:
    known = [d for d in dtypes if d is not None]
    return max(known, key=lambda d: dtype_factor(d, chip)) if known else None


def op_costs(ops: Iterable[OpInfo], assignment: QconfigAssignment, chip: str | ChipSpec) -> dict[str, float]:
    """Per-op cost of ``assignment`` on ``chip``, using each gemm's effective input dtypes.

    Args:
        ops: the ops (``OpInfo``) in graph order.
        assignment: a ``QconfigAssignment`` (its ``qconfigs`` and ``input_dtypes(op)``).
        chip: chip name or spec.
    """
    spec = get_chip(chip)
    qconfigs: Mapping[str, Any] = assignment.qconfigs
    costs: dict[str, float] = {}
    for op in ops:
        qconfig = qconfigs[op.name]
        inputs = assignment.input_dtypes(op)
        is_gemm = getattr(op.kind, "value", op.kind) == "gemm"
        if is_gemm and op.is_matmul:
            first = inputs[0] if inputs else None
            second = inputs[1] if len(inputs) > 1 else first
            costs[op.name] = op_cost(op.flops, first, second, qconfig.output_dtype, spec, True)
        elif is_gemm:
            act = _widest(inputs, spec)
            costs[op.name] = op_cost(op.flops, act, qconfig.weight_dtype, qconfig.output_dtype, spec, True)
        else:
            act = _widest(inputs, spec)
            costs[op.name] = op_cost(op.flops, act, None, qconfig.output_dtype, spec, False)
    return costs


def model_cost(ops: Iterable[OpInfo], assignment: QconfigAssignment, chip: str | ChipSpec) -> float:
    """Total relative cost of ``assignment`` on ``chip`` (the sum of :func:`op_costs`)."""
    return float(sum(op_costs(ops, assignment, chip).values()))
