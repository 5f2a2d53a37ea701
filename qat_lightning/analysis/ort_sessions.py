"""onnxruntime CPU sessions on an exported QDQ model, at a chosen graph optimization level.

onnxruntime runs on the CPU provider at the optimization level a user deploys with (``optimization="all"``,
``InferenceSession``'s default) and, for comparison, with graph optimizations off (``"disabled"``): the
unoptimized session executes the QDQ graph op by op in float32 (what fake quant computes), the optimized one
changes the arithmetic, so both are reported and ``passed`` is judged on the chosen level:

* ``basic``: ``WeightBiasQuantization`` stores the float bias of a Conv/Gemm/MatMul whose input and weight
  are dequantized as int32 at scale ``s_in * s_w`` (what integer hardware does; fake quant keeps the bias
  float). The shift is up to ``0.5 * s_in * s_w`` per output, i.e. ``0.5 * s_in * s_w / s_out`` output
  steps: negligible for an int8 output, tens of steps for an int16 output behind a coarse int8 input.
* ``extended``: ``QDQSelectorActionTransformer`` fuses DQ → op → Q into integer kernels (QLinearConv,
  QLinearAdd, QLinearSoftmax, QLinearConcat, ...) whose rounding differs by up to a step.

These one-step differences are real deployment arithmetic, not export errors; a model whose output amplifies
them (a LayerNorm, a coarse wide-range int8 concat) shows it here and not in fake quant.

``QDQS8ToU8Transformer`` is always disabled: onnxruntime (1.32 here) rejects its own rewrite of an opset-21
``QuantizeLinear`` that QDQ propagation inserted after a Reshape/Transpose ("output_dtype INT8 does not match
y_zero_point type UINT8", microsoft/onnxruntime#25526); that transform only shifts int8 codes to uint8. An
int8/fp16-only model can be exported with ``opset=20`` instead, which a default session loads.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "ORT_DISABLED_OPTIMIZERS",
    "ORT_LEVEL_CAUSES",
    "ORT_OPTIMIZATIONS",
    "check_optimization",
    "ort_session",
]

ORT_DISABLED_OPTIMIZERS = ("QDQS8ToU8Transformer",)

ORT_OPTIMIZATIONS: tuple[str, ...] = ("disabled", "basic", "extended", "all")
"""onnxruntime graph optimization levels ``check_export`` runs (``GraphOptimizationLevel.ORT_*``)."""

ORT_LEVEL_CAUSES: dict[str, str] = {
    "basic": "WeightBiasQuantization (int32 bias at scale s_in * s_w)",
    "extended": "QDQSelectorActionTransformer (fused integer kernels: QLinearConv, QLinearAdd, ...)",
}
"""The onnxruntime transformers that change the arithmetic, by the level that enables them."""


def check_optimization(optimization: str) -> str:
    """Validate an onnxruntime optimization level name (see ``ORT_OPTIMIZATIONS``)."""
    if optimization not in ORT_OPTIMIZATIONS:
        raise ValueError(f"optimization must be one of {', '.join(ORT_OPTIMIZATIONS)}, got {optimization!r}")
    return optimization


def ort_session(
    onnx_model: str | os.PathLike[str] | bytes,
    optimization: str = "all",
    optimized_path: str | os.PathLike[str] | None = None,
) -> Any:
    """Open an onnxruntime CPU session (see the module docstring for the options).

    Args:
        onnx_model: an ONNX file or its serialized bytes.
        optimization: graph optimization level, one of ``ORT_OPTIMIZATIONS``.
        optimized_path: where onnxruntime writes the optimized graph (``None``: nowhere).
    """
    import onnxruntime as ort

    levels = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disabled": levels.ORT_DISABLE_ALL,
        "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED,
        "all": levels.ORT_ENABLE_ALL,
    }[check_optimization(optimization)]
    options.log_severity_level = 3  # the "optimized model holds hardware-specific ops" warning
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    model = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(
        model, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS)
    )
