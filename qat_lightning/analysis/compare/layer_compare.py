"""Layer-by-layer comparison table and advisor (the seed's ``qa.compare_per_layer()``).

:func:`compare_layers` turns the summaries of
:func:`~qat_lightning.analysis.compare.layer_record.record_layers`
into the table (the seed's columns plus ``clip_share``, ``round_share`` and ``clip_ratio``: the share of
the op's own quant error, in squared error, due to clipping vs rounding, and the share of clipped
elements) and the advisor (see :func:`advise`). Column definitions:
:mod:`qat_lightning.analysis.compare.stats`
(``max_atol_diff`` = Atol, ``max_qscale_diff`` = Atol / qscale: how many quantization steps off).

``quant_dtype``, ``qscale`` and the clipping/rounding columns describe the op's *report node*
(:mod:`~qat_lightning.analysis.compare.layer_record`): its output node when that quantizes to an integer
dtype, else its first integer input node (an int8-input gemm with an fp16 output, as on j6p recipes). In
the second case the compared output is not the tensor that node quantizes: ``max_qscale_diff`` is NaN (the
output error counted in the input's steps means nothing), and the ``int16`` advice measures the range of
the tensor entering the input node (in the quantized run), not the op's output range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from qat_lightning.analysis.compare.layer_record import OpRecord
from qat_lightning.analysis.compare.stats import Moments

__all__ = ["LayerRow", "Advice", "LayerComparison", "compare_layers", "advise"]


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table (the seed's columns + the clipping/rounding split)."""

    index: int
    mod_name: str
    base_op_type: str
    analy_op_type: str
    shape: tuple[int, ...]
    quant_dtype: str
    qscale: float
    cosine: float
    mse: float
    l1: float
    kl: float
    sqnr: float
    atol: float
    rtol: float
    base_model_min: float
    analy_model_min: float
    base_model_max: float
    analy_model_max: float
    base_model_mean: float
    analy_model_mean: float
    base_model_var: float
    analy_model_var: float
    max_atol_diff: float
    max_qscale_diff: float
    clip_share: float
    round_share: float
    clip_ratio: float
    base_nonfinite: int = 0
    analy_nonfinite: int = 0
    aligned: bool = True


@dataclass(frozen=True)
class Advice:
    """One advisor finding.

    ``kind`` is ``fixed_scale``, ``int16`` or ``nonfinite``; ``value`` the suggested fixed scale
    (``fixed_scale``) or the |max| of the tensor the int8 node quantizes (``int16``, see :func:`advise`).
    """

    op_name: str
    kind: str
    message: str
    value: float = math.nan


@dataclass(frozen=True)
class LayerComparison:
    """The per-layer table, the advisor findings and the ops without a float counterpart."""

    rows: tuple[LayerRow, ...]
    advice: tuple[Advice, ...]
    unaligned: tuple[tuple[str, str], ...] = ()
    not_run: tuple[str, ...] = ()

    def row(self, name: str) -> LayerRow:
        """Return the row of op ``name``."""
        for r in self.rows:
            if r.mod_name == name:
                return r
        raise ValueError(f"no op {name!r} in the comparison")

    def advice_for(self, name: str) -> tuple[Advice, ...]:
        """Return the advisor findings about op ``name``."""
        return tuple(a for a in self.advice if a.op_name == name)


def _row(index: int, rec: OpRecord) -> LayerRow:
    node = rec.node
    dtype = node.dtype if node is not None else None
    scale = (
        float(node.scale.max()) if node is not None and dtype is not None and dtype.is_integer else math.nan
    )
    p = rec.pair
    base = p.base if rec.aligned and p.count else Moments()
    analy = p.analy if rec.aligned and p.count else rec.analy_only
    nan = math.nan
    have = rec.aligned and p.count > 0
    clip = rec.clip
    share = clip.clip_share
    return LayerRow(
        index=index,
        mod_name=rec.name,
        base_op_type=rec.base_type,
        analy_op_type=rec.analy_type,
        shape=rec.shape,
        quant_dtype=str(dtype) if dtype is not None else "float32",
        qscale=scale,
        cosine=p.cosine if have else nan,
        mse=p.mse if have else nan,
        l1=p.l1 if have else nan,
        kl=p.kl if have else nan,
        sqnr=p.sqnr if have else nan,
        atol=p.max_abs if have else nan,
        rtol=p.max_rel if have else nan,
        base_model_min=base.min if base.n else nan,
        analy_model_min=analy.min if analy.n else nan,
        base_model_max=base.max if base.n else nan,
        analy_model_max=analy.max if analy.n else nan,
        base_model_mean=base.mean if base.n else nan,
        analy_model_mean=analy.mean if analy.n else nan,
        base_model_var=base.var,
        analy_model_var=analy.var,
        max_atol_diff=p.max_abs if have else nan,
        max_qscale_diff=p.max_abs / scale if have and rec.node_is_output and scale > 0 else nan,
        clip_share=share,
        round_share=1.0 - share if not math.isnan(share) else nan,
        clip_ratio=clip.clip_ratio,
        base_nonfinite=base.nonfinite,
        analy_nonfinite=analy.nonfinite,
        aligned=rec.aligned,
    )


def advise(
    rows: Iterable[LayerRow],
    records: dict[str, OpRecord],
    range_factor: float = 1.5,
    int8_limit: float = 10.0,
) -> tuple[Advice, ...]:
    """Run the advisor (the seed's "Attention" after the per-layer table) over the rows, in order.

    Findings:

    * ``nonfinite``: NaN/inf in the float or the quantized output;
    * ``fixed_scale``: the float |max| exceeds ``range_factor`` × the calibrated range ``qmax * scale``
      of the op's output node: the calibration range is too small (too little/biased calibration data, a
      missing fixed scale, a shared module); suggests ``fixed_scale = |max| / qmax`` (threshold |max|);
    * ``int16``: an int8 op whose float |max| exceeds ``int8_limit`` (the seed: above 10 int8 is not
      recommended): suggests qint16. The range is that of the tensor the op's int8 report node quantizes:
      the float output for an output node, the tensor entering it for an input node (an op without an
      integer output node; ``value`` is then that range).
    """
    found: list[Advice] = []
    for row in rows:
        if row.base_nonfinite or row.analy_nonfinite:
            found.append(
                Advice(
                    row.mod_name,
                    "nonfinite",
                    f"{row.base_nonfinite} non-finite float values, {row.analy_nonfinite} non-finite "
                    "quantized values: check the float model / the inputs (NaN/inf)",
                )
            )
        amax = max(abs(row.base_model_min), abs(row.base_model_max))
        if math.isnan(amax):
            continue
        rec = records.get(row.mod_name)
        node = rec.node if rec is not None else None
        if node is not None and node.dtype.is_integer and not math.isnan(row.qscale):
            is_output = rec is not None and rec.node_is_output
            calib = node.dtype.qmax * row.qscale
            if is_output and amax > range_factor * calib:
                scale = amax / node.dtype.qmax
                share = (
                    "" if math.isnan(row.clip_share) else f", clipping is {row.clip_share:.0%} of its error"
                )
                found.append(
                    Advice(
                        row.mod_name,
                        "fixed_scale",
                        f"float range |max| {amax:.6g} exceeds the calibrated range {calib:.6g} "
                        f"({node.dtype} qmax x scale {row.qscale:.6g}){share}: set a fixed scale "
                        f"{scale:.6g} (threshold {amax:.6g}) or calibrate with data covering this range",
                        scale,
                    )
                )
        if row.quant_dtype == "qint8":
            found += _int16_advice(row, rec, amax, int8_limit)
    return tuple(found)


def _int16_advice(row: LayerRow, rec: OpRecord | None, amax: float, int8_limit: float) -> list[Advice]:
    """Return the ``int16`` finding of an int8 row, measured on the tensor its report node quantizes."""
    if rec is None or rec.node is None or rec.node_is_output:
        if not amax > int8_limit:
            return []
        message = f"int8 op with float |max| {amax:.6g} > {int8_limit:g}: use qint16"
        return [Advice(row.mod_name, "int16", message, amax)]
    seen = rec.clip.absmax if rec.clip.count else math.nan
    if not seen > int8_limit:
        return []
    message = (
        f"int8 input node {rec.node.name} quantizes a tensor with |max| {seen:.6g} > {int8_limit:g}: "
        "use qint16 for this input"
    )
    return [Advice(row.mod_name, "int16", message, seen)]


def compare_layers(
    records: dict[str, OpRecord], order: list[str], range_factor: float = 1.5, int8_limit: float = 10.0
) -> LayerComparison:
    """Build the table and the advice from :func:`record_layers` output.

    Args:
        records: per-op summaries.
        order: op names in execution order (ops that never ran are listed in ``not_run``, not as rows).
        range_factor: see :func:`advise`.
        int8_limit: see :func:`advise`.
    """
    rows = tuple(_row(i, records[n]) for i, n in enumerate(order))
    ran = set(order)
    unaligned = tuple(
        (r.name, r.reason or "not aligned") for r in records.values() if not r.aligned and r.name in ran
    )
    not_run = tuple(n for n in records if n not in ran)
    return LayerComparison(rows, advise(rows, records, range_factor, int8_limit), unaligned, not_run)
