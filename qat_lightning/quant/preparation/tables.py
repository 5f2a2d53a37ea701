"""What ``prepare`` quantizes: module and function tables, op naming and FLOP counting.

Shared by the fx and eager paths so both give an op the same name, type, kind and cost.

* Module ops: the float module's class decides (``GEMM_MODULES``: conv / conv-transpose / linear get input
  + per-channel weight + output quant points; ``OTHER_MODULES``: norms, activations, pooling, resizing get
  an output quant point).
* Functional ops and operators (fx only): ``FUNCTION_OPS`` (``call_function`` targets) and
  ``METHOD_OPS`` (``call_method`` names) map to a base name (``add``, ``matmul``, ``softmax``) that is
  also the op type.
* Names: see :class:`OpNamer` (``naming``, re-exported here); FLOP counting: ``op_costs``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qat_lightning.quant.nodes.attention import LAYOUT_MODULES, MatMul
from qat_lightning.quant.preparation.naming import OpNamer

__all__ = [
    "GemmSpec",
    "GEMM_MODULES",
    "FUNCTION_MODULES",
    "OTHER_MODULES",
    "PASS_THROUGH_MODULES",
    "FUNCTION_OPS",
    "METHOD_OPS",
    "GEMM_FUNCTIONS",
    "TRANSPARENT_FUNCTIONS",
    "TRANSPARENT_METHODS",
    "CONV_TYPES",
    "BN_FOR_CONV",
    "is_stub",
    "is_dequant_stub",
    "module_op_type",
    "OpNamer",
]


@dataclass(frozen=True)
class GemmSpec:
    """How to quantize the weight of a gemm module: which attribute, which channel axis."""

    kind: str  # "conv", "conv_transpose", "linear" or "embedding" (a per-row quantized lookup table)
    weight_ch_axis: int


GEMM_MODULES: dict[type[nn.Module], GemmSpec] = {
    nn.Conv1d: GemmSpec("conv", 0),
    nn.Conv2d: GemmSpec("conv", 0),
    nn.Conv3d: GemmSpec("conv", 0),
    nn.ConvTranspose1d: GemmSpec("conv_transpose", 1),
    nn.ConvTranspose2d: GemmSpec("conv_transpose", 1),
    nn.ConvTranspose3d: GemmSpec("conv_transpose", 1),
    nn.Linear: GemmSpec("linear", 0),
    nn.Embedding: GemmSpec("embedding", 0),
}

#: Gemm types whose subclasses are quantized as the base (an ``nn.Embedding`` subclass may look up otherwise).
_SUBCLASSED_GEMMS: tuple[type[nn.Module], ...] = tuple(t for t in GEMM_MODULES if t is not nn.Embedding)

#: Modules that compute one functional gemm (both inputs are activations): module type -> op type.
FUNCTION_MODULES: dict[type[nn.Module], str] = {MatMul: "matmul"}

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_FOR_CONV: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}

OTHER_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Softmax,
    nn.LogSoftmax,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)

#: Modules that do not change values (or only drop them): no quant point, and producers are traced through.
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
    DeQuantStub,
    *LAYOUT_MODULES,
)


def is_stub(module: nn.Module) -> bool:
    """Tell whether ``module`` is a user-placed torch.ao ``QuantStub`` (a model-input quant point)."""
    return isinstance(module, QuantStub)


def is_dequant_stub(module: nn.Module) -> bool:
    """Tell whether ``module`` is a user-placed torch.ao ``DeQuantStub`` (becomes the identity)."""
    return isinstance(module, DeQuantStub)


def module_op_type(module: nn.Module) -> str | None:
    """Op type of a quantizable module (its class name), ``"quant"`` for a QuantStub, else ``None``."""
    if is_stub(module):
        return "quant"
    cls = type(module)
    if cls in GEMM_MODULES or isinstance(module, OTHER_MODULES):
        return cls.__name__
    if cls in FUNCTION_MODULES:
        return FUNCTION_MODULES[cls]
    for base in _SUBCLASSED_GEMMS:  # subclasses of conv / linear (e.g. NonDynamicallyQuantizableLinear)
        if isinstance(module, base):
            return base.__name__
    return None


def gemm_spec_of(module: nn.Module) -> GemmSpec | None:
    """Return the :class:`GemmSpec` of a conv / conv-transpose / linear module (subclasses too)."""
    spec = GEMM_MODULES.get(type(module))
    if spec is not None:
        return spec
    for base in _SUBCLASSED_GEMMS:
        if isinstance(module, base):
            return GEMM_MODULES[base]
    return None


def _fn_table() -> dict[Callable[..., Any], str]:
    table: dict[Callable[..., Any], str] = {
        operator.add: "add",
        operator.iadd: "add",
        torch.add: "add",
        operator.sub: "sub",
        operator.isub: "sub",
        torch.sub: "sub",
        torch.subtract: "sub",
        operator.mul: "mul",
        operator.imul: "mul",
        torch.mul: "mul",
        torch.multiply: "mul",
        operator.truediv: "div",
        operator.itruediv: "div",
        torch.div: "div",
        torch.true_divide: "div",
        torch.cat: "cat",
        torch.concat: "cat",
        torch.concatenate: "cat",
        torch.stack: "stack",
        operator.matmul: "matmul",
        torch.matmul: "matmul",
        torch.bmm: "bmm",
        F.linear: "linear",
        F.conv1d: "conv1d",
        F.conv2d: "conv2d",
        F.conv3d: "conv3d",
        F.softmax: "softmax",
        torch.softmax: "softmax",
        F.log_softmax: "log_softmax",
        torch.log_softmax: "log_softmax",
        F.relu: "relu",
        torch.relu: "relu",
        torch.relu_: "relu",
        F.relu6: "relu6",
        F.gelu: "gelu",
        F.silu: "silu",
        F.sigmoid: "sigmoid",
        torch.sigmoid: "sigmoid",
        F.tanh: "tanh",
        torch.tanh: "tanh",
        F.hardswish: "hardswish",
        F.hardsigmoid: "hardsigmoid",
        F.hardtanh: "hardtanh",
        F.leaky_relu: "leaky_relu",
        F.elu: "elu",
        F.mish: "mish",
        F.softplus: "softplus",
        F.layer_norm: "layer_norm",
        F.group_norm: "group_norm",
        F.max_pool1d: "max_pool1d",
        F.max_pool2d: "max_pool2d",
        F.max_pool3d: "max_pool3d",
        F.avg_pool1d: "avg_pool1d",
        F.avg_pool2d: "avg_pool2d",
        F.avg_pool3d: "avg_pool3d",
        F.adaptive_avg_pool1d: "adaptive_avg_pool1d",
        F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
        F.adaptive_avg_pool3d: "adaptive_avg_pool3d",
        F.adaptive_max_pool1d: "adaptive_max_pool1d",
        F.adaptive_max_pool2d: "adaptive_max_pool2d",
        F.interpolate: "interpolate",
        torch.mean: "mean",
        torch.sum: "sum",
        torch.exp: "exp",
        torch.log: "log",
        torch.sqrt: "sqrt",
        torch.rsqrt: "rsqrt",
        torch.pow: "pow",
        F.normalize: "normalize",
    }
    return table


#: ``call_function`` target -> base name (= op type of the functional op).
FUNCTION_OPS: dict[Callable[..., Any], str] = _fn_table()

#: ``call_method`` name -> base name.
METHOD_OPS: dict[str, str] = {
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
    "matmul": "matmul",
    "bmm": "bmm",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
    "mean": "mean",
    "sum": "sum",
    "exp": "exp",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "pow": "pow",
}

#: Functional gemm ops: base name -> (activation arg positions, weight arg position or None, weight ch axis).
GEMM_FUNCTIONS: dict[str, tuple[tuple[int, ...], int | None, int]] = {
    "matmul": ((0, 1), None, 0),
    "bmm": ((0, 1), None, 0),
    "linear": ((0,), 1, 0),
    "conv1d": ((0,), 1, 0),
    "conv2d": ((0,), 1, 0),
    "conv3d": ((0,), 1, 0),
}

#: Ops that only move or drop values: an op's input producer is looked up through them.
TRANSPARENT_FUNCTIONS: frozenset[Any] = frozenset(
    {
        operator.getitem,
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.chunk,
        torch.split,
        torch.unbind,
        F.dropout,
        F.pixel_shuffle,
    }
)
TRANSPARENT_METHODS: frozenset[str] = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "chunk",
        "split",
        "unbind",
        "clone",
        "detach",
        "to",
        "type_as",
        "float",
    }
)
