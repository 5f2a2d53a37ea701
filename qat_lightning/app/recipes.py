"""Precision recipes: from ``conf/recipe/*.yaml`` to a ``QconfigSetter``, with the chip rules checked first.

A :class:`Recipe` is the fully decided form of a recipe: the base dtypes of the YAML plus what tuning
decided (which ops were raised to int16 by the sensitivity search, which ops went to fp16). It is stored
inside every checkpoint the app writes (``checkpoint["qat_lightning"]["recipe"]``), so a later stage
(``stage=qat ckpt=...``) rebuilds exactly the qconfig the checkpoint was calibrated with.

Setter built from a recipe (later entries override earlier ones, see ``QconfigSetter``):

1. reference qconfig: ``get_qconfig(weight_dtype=weight, out_dtype=activation, observer=...)``;
2. ``ConvDtypeTemplate(gemm_input, gemm_weight)`` and ``MatmulDtypeTemplate(matmul_input)`` when set;
3. ``ModuleNameTemplate``: ``{"": other}``, then every ``fp16_ops`` name -> float16, then ``module_names``;
4. ``SensitivityTemplate`` over the raised ops (a table holding exactly those rows) -> ``sensitive_dtype``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qat_lightning.app.schema import CalibrationConf, ChipConf, RecipeConf
from qat_lightning.chips import get_chip

__all__ = [
    "Recipe",
    "RecipeError",
    "check_chip",
    "chip_problems",
    "load_recipe_conf",
    "raised_ops",
    "recipe_from_conf",
]


class RecipeError(ValueError):
    """A recipe the chip cannot run (names the chip rule and how to get past it)."""


def _name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _pair(values: Sequence[Any] | None) -> tuple[str, str] | None:
    if values is None:
        return None
    names = [str(_name(v)) for v in values]
    if len(names) not in (1, 2):
        raise RecipeError(f"recipe.matmul_input takes one or two dtypes, got {names}")
    return (names[0], names[-1])


@dataclass(frozen=True)
class Recipe:
    """A decided precision recipe (plain values, JSON-able, stored in checkpoints).

    Attributes:
        name: the recipe it started from (``int8``, ``int8_int16``, ...), plus what tuning added.
        chip: target chip.
        on_violation: ``error`` or ``downgrade``.
        quantize: ``False`` = float reference.
        activation: reference output dtype.
        weight: reference weight dtype.
        other: output dtype of every op (``None`` = reference).
        gemm_input: conv/linear input dtype (``None`` = as produced).
        gemm_weight: conv/linear weight dtype (``None`` = reference).
        matmul_input: the two matmul input dtypes (``None`` = as produced).
        observer: activation observer.
        observer_kwargs: activation observer arguments.
        weight_observer: weight observer.
        raised: ``(op_name, sensitive_type)`` pairs raised to ``sensitive_dtype``.
        sensitive_dtype: dtype of the raised ops.
        fp16_ops: op names moved to float16.
        module_names: extra name rules (prefix -> dtype name or dict).
    """

    name: str
    chip: str
    on_violation: str = "error"
    quantize: bool = True
    activation: str = "qint8"
    weight: str = "qint8"
    other: str | None = None
    gemm_input: str | None = None
    gemm_weight: str | None = None
    matmul_input: tuple[str, str] | None = None
    observer: str = "mse"
    observer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weight_observer: str = "minmax"
    raised: tuple[tuple[str, str], ...] = ()
    sensitive_dtype: str = "qint16"
    fp16_ops: tuple[str, ...] = ()
    module_names: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Recipe:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and JSON)."""
        out = dataclasses.asdict(self)
        out["raised"] = [list(r) for r in self.raised]
        out["fp16_ops"] = list(self.fp16_ops)
        out["observer_kwargs"] = dict(self.observer_kwargs)
        out["module_names"] = dict(self.module_names)
        if self.matmul_input is not None:
            out["matmul_input"] = list(self.matmul_input)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; expected {sorted(names)}")
        values = dict(data)
        values["raised"] = tuple((str(a), str(b)) for a, b in values.get("raised", ()))
        values["fp16_ops"] = tuple(values.get("fp16_ops", ()))
        if values.get("matmul_input") is not None:
            values["matmul_input"] = tuple(values["matmul_input"])
        return cls(**values)

    def describe(self) -> str:
        """One line: ``int8_int16 (j6m): base qint8/w qint8, 2 op(s) -> qint16, 0 op(s) -> float16``."""
        if not self.quantize:
            return f"{self.name}: float (no quantization)"
        base = f"act {self.activation}, weight {self.weight}"
        if self.other:
            base += f", other ops {self.other}"
        if self.gemm_input or self.gemm_weight:
            base += f", gemm in {self.gemm_input or 'as produced'}/w {self.gemm_weight or self.weight}"
        if self.matmul_input:
            base += f", matmul in {'/'.join(self.matmul_input)}"
        extra = []
        if self.raised:
            extra.append(f"{len(self.raised)} sensitive row(s) -> {self.sensitive_dtype}")
        if self.fp16_ops:
            extra.append(f"{len(self.fp16_ops)} op(s) -> float16")
        if self.module_names:
            extra.append(f"{len(self.module_names)} name rule(s)")
        tail = f"; {', '.join(extra)}" if extra else ""
        return f"{self.name} ({self.chip}, {self.observer}): {base}{tail}"

    def setter(self) -> Any:
        """Build the ``QconfigSetter`` of this recipe (``None`` for the float recipe)."""
        if not self.quantize:
            return None
        from qat_lightning.quant.dtypes import float16
        from qat_lightning.quant.qconfig import get_qconfig
        from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable
        from qat_lightning.quant.qconfig.setter import QconfigSetter
        from qat_lightning.quant.qconfig.templates import (
            ConvDtypeTemplate,
            MatmulDtypeTemplate,
            ModuleNameTemplate,
            SensitivityTemplate,
        )

        reference = get_qconfig(
            weight_dtype=self.weight,
            out_dtype=self.activation,
            observer=self.observer,
            weight_observer=self.weight_observer,
            **dict(self.observer_kwargs),
        )
        templates: list[Any] = []
        if self.gemm_input or self.gemm_weight:
            templates.append(ConvDtypeTemplate(input_dtype=self.gemm_input, weight_dtype=self.gemm_weight))
        if self.matmul_input:
            templates.append(MatmulDtypeTemplate(input_dtypes=tuple(self.matmul_input)))
        names: dict[str, Any] = {}
        if self.other:
            names[""] = self.other
        names.update({op: float16 for op in self.fp16_ops})
        names.update({k: dict(v) if isinstance(v, Mapping) else v for k, v in self.module_names.items()})
        if names:
            templates.append(ModuleNameTemplate(names))
        if self.raised:
            rows = tuple(
                SensitivityRow(op, kind, "", float(len(self.raised) - i), self.sensitive_dtype)
                for i, (op, kind) in enumerate(self.raised)
            )
            table = SensitivityTable(rows, metric_name="rank", output_name="recipe")
            templates.append(SensitivityTemplate(table, len(rows), None, self.sensitive_dtype))
        # Tuned ops follow the searches' rule: what the chip cannot take as a consequence (both matmul inputs
        # int16 on j6m, a gemm fed by an fp16 op) is downgraded and listed in qconfig_changelog.txt; the base
        # recipe was checked strictly (check_chip).
        policy = "downgrade" if self.raised or self.fp16_ops else self.on_violation
        return QconfigSetter(reference, templates, chip=self.chip, on_violation=policy)


def recipe_from_conf(recipe: RecipeConf, chip: ChipConf, calibration: CalibrationConf) -> Recipe:
    """Build the base :class:`Recipe` of a config (nothing raised yet; ``fp16_ops`` as listed).

    Raises:
        RecipeError: when the chip cannot run the recipe (see :func:`check_chip`).
    """
    result = Recipe(
        name=_name(recipe.name) or "custom",
        chip=_name(chip.name) or "j6m",
        on_violation=_name(chip.on_violation) or "error",
        quantize=recipe.quantize,
        activation=_name(recipe.activation) or "qint8",
        weight=_name(recipe.weight) or "qint8",
        other=_name(recipe.other),
        gemm_input=_name(recipe.gemm_input),
        gemm_weight=_name(recipe.gemm_weight),
        matmul_input=_pair(recipe.matmul_input),
        observer=_name(calibration.observer) or "mse",
        observer_kwargs=dict(calibration.observer_kwargs),
        weight_observer=_name(calibration.weight_observer) or "minmax",
        sensitive_dtype=_name(recipe.sensitive_dtype) or "qint16",
        fp16_ops=tuple(recipe.fp16_ops),
        module_names=dict(recipe.module_names),
    )
    check_chip(result)
    return result


def chip_problems(recipe: Recipe) -> list[str]:
    """List the chip rules a recipe's base dtypes break, one line each (empty = runnable).

    Only what the recipe asks of every op is checked here (with the effective dtypes: a gemm input left
    as produced has the producers' output dtype); per-op rules (a sensitive op raised to int16 on both
    inputs) are checked by the ``QconfigSetter`` when the model is prepared.
    """
    if not recipe.quantize:
        return []
    spec = get_chip(recipe.chip)
    problems: list[str] = []
    produced = recipe.other or recipe.activation
    gemm_in = recipe.gemm_input or produced
    gemm_w = recipe.gemm_weight or recipe.weight
    mm = recipe.matmul_input or (produced, produced)
    allowed = "/".join(spec.gemm_input_dtypes)
    for what, dtype in (
        ("gemm input", gemm_in),
        ("gemm weight", gemm_w),
        ("matmul input 0", mm[0]),
        ("matmul input 1", mm[1]),
    ):
        if not spec.allows_gemm_input(dtype):
            problems.append(f"{spec.name}: {what} {dtype} is not supported (gemm inputs must be {allowed})")
    if not spec.gemm_double_int16:
        if gemm_w == "qint16" and gemm_in == "qint16":
            problems.append(
                f"{spec.name}: gemm cannot take int16 on both activation and weight "
                f"(recipe asks gemm input {gemm_in}, weight {gemm_w})"
            )
        if mm[0] == "qint16" and mm[1] == "qint16":
            problems.append(
                f"{spec.name}: matmul cannot take int16 on both inputs "
                f"(recipe asks matmul inputs {mm[0]}/{mm[1]}; use matmul_input: [qint16, qint8])"
            )
    for what, dtype in (("activation", recipe.activation), ("other", recipe.other)):
        if dtype == "float32" and not spec.fp32_ops:
            problems.append(f"{spec.name}: float32 outputs are not supported ({what}: float32)")
        elif dtype is not None and dtype != "float32" and dtype not in spec.other_dtypes:
            problems.append(f"{spec.name}: op outputs cannot be {dtype} ({what})")
    return problems


def check_chip(recipe: Recipe) -> None:
    """Refuse (``on_violation=error``) a recipe whose base dtypes the chip cannot run.

    With ``on_violation=downgrade`` nothing is refused here: ``prepare`` downgrades each offending op to the
    nearest supported dtype and lists every change (``qconfig_changelog.txt`` and the log).

    Raises:
        RecipeError: naming the chip rule(s), the recipe and the ways out.
    """
    problems = chip_problems(recipe)
    if problems and recipe.on_violation == "error":
        lines = "\n  ".join(problems)
        raise RecipeError(
            f"recipe={recipe.name} cannot run on chip={recipe.chip}:\n  {lines}\n"
            "choose a recipe this chip supports (e.g. int16 = int16 activations, int8 weights on j6e/j6m; "
            "gemm_int16_other_fp16 is for j6p), or pass chip.on_violation=downgrade to downgrade each "
            "offending op to the nearest supported dtype (every change is listed in qconfig_changelog.txt)"
        )


def raised_ops(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Distinct op names of raised ``(op, sensitive_type)`` pairs, in order."""
    return list(dict.fromkeys(op for op, _ in pairs))


def load_recipe_conf(conf_dir: Path, name: str) -> RecipeConf:
    """Read ``<conf_dir>/recipe/<name>.yaml`` into the typed :class:`RecipeConf` (the pipeline's steps).

    Raises:
        FileNotFoundError: listing the recipes that exist.
    """
    from omegaconf import OmegaConf

    from qat_lightning.app.schema import writable_structured

    path = Path(conf_dir) / "recipe" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(conf_dir) / "recipe").glob("*.yaml"))
        raise FileNotFoundError(f"recipe {name!r} not found in {path.parent}; known: {', '.join(known)}")
    merged = OmegaConf.merge(writable_structured(RecipeConf), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
