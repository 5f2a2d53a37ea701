"""``QconfigSetter``: reference qconfig + templates + chip rules -> one :class:`QConfig` per op.

Precedence (what decides an op's QConfig), in the order it is applied:

1. Every op starts from ``reference_qconfig`` (``get_qconfig()`` = int8 outputs, int8 weights, when
   ``None``).
2. Type templates (:class:`ConvDtypeTemplate`, :class:`MatmulDtypeTemplate`) are applied in list order.
3. Name templates (:class:`ModuleNameTemplate`) are applied in list order, after all type templates: an
   explicit name beats a type rule wherever each sits in the list. Within one ModuleNameTemplate every
   matching prefix applies, shortest first, so the most specific prefix wins.
4. Sensitivity templates (:class:`SensitivityTemplate`) are applied last, in list order, and only raise
   precision (``qint8 < qint16 < float16 < float32``): an op at or above ``high_dtype`` stays as it is,
   e.g. a float16 op stays float16 when ``high_dtype=qint16``.
5. The chip rules check the final result using *effective* dtypes (a gemm input left as produced has
   its producer op's output dtype): ``on_violation="error"`` raises one ``ValueError`` naming every
   offending op and rule; ``"downgrade"`` changes the dtype to the nearest supported one and lists each
   change in ``QconfigAssignment.changelog`` (never silently).

Within steps 2-4 a template sets only the fields it names, so a later template overrides an earlier one
field by field: ConvDtypeTemplate sets ``input_dtype``/``weight_dtype``; MatmulDtypeTemplate sets the
per-input ``input_dtype``; a bare dtype in ModuleNameTemplate sets ``output_dtype`` only; a dict sets its
keys (an ``observer`` without a ``threshold`` also clears an earlier threshold); a full QConfig sets every
field.

A tuple/list of setters (the seed's ``qconfig_setter=(s1, s2, default_...)``) is composed into one
setter in which EARLIER entries take priority: its templates are those of the entries in reverse order
(so within each stage an earlier entry's templates run later and win), its reference qconfig is the one
of the earliest entry that has one, and its chip is the one chip the entries name.

Chip downgrades: a float gemm input or weight -> qint16; then, where the chip forbids double int16, a
gemm weight (a matmul's second input) qint16 -> qint8; a float32 output of an op the chip cannot run in
float32 -> float16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from qat_lightning.chips import ChipSpec, get_chip
from qat_lightning.quant.dtypes import QuantDtype, float16, qint8, qint16
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.qconfig.qconfig import QConfig, get_qconfig
from qat_lightning.quant.qconfig.templates import (
    Template,
    effective_input_dtypes,
)

__all__ = [
    "ON_VIOLATION",
    "ChipIssue",
    "QconfigAssignment",
    "QconfigSetter",
    "as_qconfig_setter",
    "chip_issues",
]

ON_VIOLATION = ("error", "downgrade")


@dataclass(frozen=True)
class ChipIssue:
    """One quant point of one op that asks for what the chip lacks, with its downgrade.

    Attributes:
        op: op name.
        point: ``input.<i>``, ``weight`` or ``output``.
        before: the (effective) dtype asked for.
        after: the nearest dtype the chip supports.
        rule: the chip rule, e.g. ``j6m: gemm cannot take int16 on both activation and weight``.
        inherited_from: the producer op when ``before`` is an input left as produced.
        cascade: only arises after another downgrade of the same op (not reported as an error).
    """

    op: str
    point: str
    before: QuantDtype | None
    after: QuantDtype
    rule: str
    inherited_from: str | None = None
    cascade: bool = False

    def line(self) -> str:
        """One changelog line: ``conv1: weight qint16 -> qint8 (j6m: ...)``."""
        source = f" (from {self.inherited_from})" if self.inherited_from else ""
        return f"{self.op}: {self.point} {self.before}{source} -> {self.after} ({self.rule})"

    def problem(self) -> str:
        """One error line: ``conv1: weight is qint16 (j6m: ...)``."""
        source = f" (from {self.inherited_from})" if self.inherited_from else ""
        return f"{self.op}: {self.point} is {self.before}{source} ({self.rule})"


def chip_issues(
    op: OpInfo,
    inputs: Sequence[QuantDtype | None],
    weight: QuantDtype | None,
    output: QuantDtype | None,
    chip: str | ChipSpec,
) -> list[ChipIssue]:
    """Check one op's effective dtypes against a chip; return the issues in the order to fix them.

    The no-double-int16 rule (j6e/j6m) compares a conv/linear's weight with its activation input
    (``input.0``) only: a fused conv+add's residual operand (``input.1``) is not multiplied by the weight.

    Args:
        op: the op.
        inputs: effective dtype of each input (``None`` = unknown, not checked).
        weight: weight dtype (gemm ops other than matmul), ``None`` if none.
        output: output dtype, ``None`` if no output quant point.
        chip: chip name or spec.
    """
    spec = get_chip(chip)
    issues: list[ChipIssue] = []
    gemm = op.kind == OpKind.GEMM
    ins = list(inputs)
    w = weight if gemm and not op.is_matmul else None
    if gemm:
        allowed = "/".join(spec.gemm_input_dtypes)
        for i, d in enumerate(ins):
            if not spec.allows_gemm_input(d):
                rule = f"{spec.name}: gemm inputs must be {allowed}; {d} gemm is not supported"
                producer = op.input_producers[i] if i < len(op.input_producers) else None
                issues.append(ChipIssue(op.name, f"input.{i}", d, qint16, rule, producer))
                ins[i] = qint16
        if not spec.allows_gemm_input(w):
            rule = f"{spec.name}: gemm weights must be {allowed}; {w} gemm is not supported"
            issues.append(ChipIssue(op.name, "weight", w, qint16, rule))
            w = qint16
    if not spec.allows_output(output, op.op_type):
        after = float16 if spec.allows_output(float16, op.op_type) else qint16
        where = f"only for {', '.join(spec.fp32_ops)}" if spec.fp32_ops else "not supported"
        if output is not None and output.is_float32:
            rule = f"{spec.name}: float32 output {where}"
        else:
            rule = f"{spec.name}: {op.op_type} cannot output {output}"
        issues.append(ChipIssue(op.name, "output", output, after, rule))
    if gemm and not spec.gemm_double_int16:
        changed = {i.point for i in issues}
        if op.is_matmul and len(ins) >= 2 and ins[0] == qint16 and ins[1] == qint16:
            rule = f"{spec.name}: matmul cannot take int16 on both inputs"
            cascade = bool(changed & {"input.0", "input.1"})
            issues.append(ChipIssue(op.name, "input.1", qint16, qint8, rule, cascade=cascade))
        elif not op.is_matmul and w == qint16 and ins and ins[0] == qint16:
            # only input 0 is multiplied by the weight: a fused conv+add's residual operand (input 1) is not
            rule = f"{spec.name}: gemm cannot take int16 on both activation and weight"
            cascade = bool(changed & {"weight", "input.0"})
            issues.append(ChipIssue(op.name, "weight", qint16, qint8, rule, cascade=cascade))
    return issues


def _fix(op: OpInfo, qconfig: QConfig, issue: ChipIssue, num_inputs: int) -> QConfig:
    if issue.point == "weight":
        return qconfig.replace(weight_dtype=issue.after)
    if issue.point == "output":
        return qconfig.replace(output_dtype=issue.after)
    index = int(issue.point.split(".")[1])
    per_input = [qconfig.input_dtype_at(i) for i in range(num_inputs)]
    per_input[index] = issue.after
    return qconfig.replace(input_dtype=tuple(per_input) if num_inputs > 1 else per_input[0])


@dataclass(frozen=True)
class QconfigAssignment:
    """The result of :meth:`QconfigSetter.assign`.

    Attributes:
        qconfigs: every op name -> its QConfig (``input_dtype`` may be a per-input tuple for matmul).
        changelog: every chip downgrade, one human line each.
        unmatched: template names/prefixes (and sensitivity-table op names) that matched no op.
        chip: the chip the rules were checked against, or ``None``.
    """

    qconfigs: Mapping[str, QConfig]
    changelog: tuple[str, ...] = ()
    unmatched: tuple[str, ...] = ()
    chip: str | None = None

    def input_dtypes(self, op: OpInfo) -> tuple[QuantDtype | None, ...]:
        """Effective dtype of each input of ``op`` (a gemm input left as produced = producer's output)."""
        return effective_input_dtypes(op, self.qconfigs)


@dataclass(frozen=True)
class QconfigSetter:
    """Reference qconfig + templates + chip: decides every op's QConfig (precedence: module docstring).

    Args:
        reference_qconfig: the starting QConfig of every op; ``None`` = ``get_qconfig()`` (all int8).
            In a composed tuple ``None`` means "no opinion" and a later entry's reference is used.
        templates: :class:`Template` objects.
        chip: target chip (``j6e``, ``j6m``, ``j6p``) or ``None`` for no chip rules.
        on_violation: ``error`` (raise naming every offending op) or ``downgrade`` (fix + changelog).

    Raises:
        ValueError: for an unknown chip (listing the chips) or on_violation value; TypeError for a
            template or reference of the wrong type.
    """

    reference_qconfig: QConfig | None = None
    templates: Sequence[Template] = ()
    chip: str | None = None
    on_violation: str = "error"

    def __post_init__(self) -> None:
        if self.reference_qconfig is not None and not isinstance(self.reference_qconfig, QConfig):
            raise TypeError(
                f"reference_qconfig must be a QConfig (get_qconfig(...)), got {self.reference_qconfig!r}"
            )
        if isinstance(self.templates, Template):
            raise TypeError("templates must be a list of templates, got a single template; wrap it in [...]")
        templates = tuple(self.templates)
        for t in templates:
            if not isinstance(t, Template):
                raise TypeError(
                    f"templates must be ModuleNameTemplate, ConvDtypeTemplate, MatmulDtypeTemplate or "
                    f"SensitivityTemplate objects, got {t!r}"
                )
        object.__setattr__(self, "templates", templates)
        if self.chip is not None:
            object.__setattr__(self, "chip", get_chip(self.chip).name)
        if self.on_violation not in ON_VIOLATION:
            raise ValueError(
                f"on_violation must be one of {', '.join(ON_VIOLATION)}, got {self.on_violation!r}"
            )

    def with_chip(self, chip: str | None, on_violation: str | None = None) -> QconfigSetter:
        """Return a copy checking against ``chip`` (and with ``on_violation`` when given)."""
        return replace(self, chip=chip, on_violation=on_violation or self.on_violation)

    def assign(self, ops: Sequence[OpInfo]) -> QconfigAssignment:
        """Decide the QConfig of every op.

        Args:
            ops: the model's ops in graph order.

        Raises:
            ValueError: duplicate op names; a chip violation with ``on_violation="error"``.
        """
        ops = list(ops)
        for op in ops:
            if not isinstance(op, OpInfo):
                raise TypeError(f"ops must be OpInfo objects, got {op!r}")
        names = [op.name for op in ops]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate op names: {', '.join(dupes)}")
        base = self.reference_qconfig if self.reference_qconfig is not None else get_qconfig()
        qconfigs: dict[str, QConfig] = {name: base for name in names}
        for stage in (Template.TYPE, Template.NAME, Template.RAISE):
            for template in self.templates:
                if template.stage == stage:
                    template.apply(ops, qconfigs)
        unmatched = tuple(dict.fromkeys(n for t in self.templates for n in t.unmatched(ops)))
        changelog: tuple[str, ...] = ()
        if self.chip is not None:
            changelog = self._apply_chip(ops, qconfigs)
        return QconfigAssignment(MappingProxyType(qconfigs), changelog, unmatched, self.chip)

    def _apply_chip(self, ops: Sequence[OpInfo], qconfigs: dict[str, QConfig]) -> tuple[str, ...]:
        spec = get_chip(self.chip)  # type: ignore[arg-type]
        problems: list[ChipIssue] = []
        changelog: list[str] = []
        for op in ops:  # graph order: a producer is fixed before its consumers read its output dtype
            qconfig = qconfigs[op.name]
            inputs = effective_input_dtypes(op, qconfigs)
            issues = chip_issues(op, inputs, qconfig.weight_dtype, qconfig.output_dtype, spec)
            if self.on_violation == "error":
                problems.extend(i for i in issues if not i.cascade)
                continue
            for issue in issues:
                qconfig = _fix(op, qconfig, issue, len(inputs))
                changelog.append(issue.line())
            qconfigs[op.name] = qconfig
        if problems:
            lines = "\n".join(f"  {p.problem()}" for p in problems)
            ops_named = len({p.op for p in problems})
            raise ValueError(
                f"the qconfig asks for what {spec.name} lacks ({ops_named} op(s)):\n{lines}\n"
                "change the templates, or pass on_violation='downgrade' to downgrade and list each change"
            )
        return tuple(changelog)


SetterLike = QconfigSetter | Template | QConfig | Sequence[QconfigSetter | Template | QConfig] | None


def as_qconfig_setter(
    value: SetterLike, *, chip: str | None = None, on_violation: str | None = None
) -> QconfigSetter:
    """Turn what ``prepare(qconfig_setter=...)`` accepts into one :class:`QconfigSetter`.

    Args:
        value: a QconfigSetter; a template; a QConfig (used as the reference qconfig of every op); a
            tuple/list of those (earlier entries take priority, see the module docstring); or ``None``
            (all int8).
        chip: when given, overrides the chip.
        on_violation: when given, overrides ``on_violation``.

    Raises:
        TypeError: for anything else (the message lists what is accepted).
        ValueError: an empty sequence, or entries naming different chips.
    """
    accepted = "a QconfigSetter, a template, a QConfig, a tuple/list of them (earlier entries win), or None"
    if value is None:
        setter = QconfigSetter()
    elif isinstance(value, QConfig):
        setter = QconfigSetter(reference_qconfig=value)
    elif isinstance(value, QconfigSetter):
        setter = value
    elif isinstance(value, Template):
        setter = QconfigSetter(templates=(value,))
    elif isinstance(value, (tuple, list)):
        if not value:
            raise ValueError(f"qconfig_setter is an empty sequence; expected {accepted}")
        entries = [as_qconfig_setter(v) if isinstance(v, (Template, QConfig)) else v for v in value]
        for entry in entries:
            if not isinstance(entry, QconfigSetter):
                raise TypeError(
                    f"qconfig_setter entry {entry!r} is not a QconfigSetter or template; expected {accepted}"
                )
        setter = _compose(entries)
    else:
        raise TypeError(f"qconfig_setter must be {accepted}; got {type(value).__name__}")
    if chip is not None or on_violation is not None:
        setter = setter.with_chip(chip if chip is not None else setter.chip, on_violation)
    return setter


def _compose(entries: Sequence[QconfigSetter]) -> QconfigSetter:
    chips = list(dict.fromkeys(e.chip for e in entries if e.chip is not None))
    if len(chips) > 1:
        raise ValueError(f"the composed setters name different chips: {', '.join(chips)}")
    reference = next((e.reference_qconfig for e in entries if e.reference_qconfig is not None), None)
    templates = tuple(t for e in reversed(entries) for t in e.templates)
    on_violation = next((e.on_violation for e in entries if e.chip is not None), "error")
    return QconfigSetter(reference, templates, chips[0] if chips else None, on_violation)
