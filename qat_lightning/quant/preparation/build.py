"""Planned ops and how one becomes an op module once its :class:`QConfig` is known (fx and eager).

Norm ops (``nn.LayerNorm``, ``nn.GroupNorm``, ``F.layer_norm``, ``F.group_norm``) become
:class:`~qat_lightning.quant.nodes.fp16_norm.QatNormOp` / ``QatNormFunction``: fp16 simulation with automatic
input scaling when their output is float16 (see :mod:`qat_lightning.quant.nodes.fp16_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat_lightning.quant.dtypes import float32
from qat_lightning.quant.nodes.embedding import QatEmbedding
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize
from qat_lightning.quant.nodes.fp16_norm import NORM_FUNCTIONS, NORM_MODULES, QatNormFunction, QatNormOp
from qat_lightning.quant.nodes.qat_modules import (
    QatConvBn,
    QatFunction,
    QatGemm,
    QatInput,
    QatModuleOp,
    QuantOp,
    activation_node,
    weight_node,
)
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.preparation.op_costs import function_flops
from qat_lightning.quant.qconfig.qconfig import QConfig

__all__ = ["OpPlan", "OpBuilder", "matmul_module_plan"]


@dataclass
class OpPlan:
    """Everything needed to build one op module, decided before qconfigs are assigned.

    Attributes:
        info: the op's :class:`OpInfo` (what templates see).
        build: ``gemm``, ``convbn``, ``module``, ``function`` or ``input``.
        module: the float module (gemm / module ops; the conv or linear of a ``convbn``).
        bn: the BatchNorm of a ``convbn``.
        gemm_kind: ``conv`` / ``conv_transpose`` / ``linear`` / ``embedding`` for gemm modules.
        weight_ch_axis: channel axis of the weight quant node.
        relu / add: fused ReLU / residual add.
        target / is_method: function (or method name) of a functional op.
        act_args: positions of a functional op's activation inputs that get input quant nodes.
        weight_arg: position of a functional op's weight argument.
        weight: the weight tensor (example value) of a functional gemm, for the channel count.
        weight_key: ops with the same key share one weight quant node (call sites of one module).
        node: the fx node(s) this op replaces (fx only).
        extra: free-form data for the graph rewrite.
    """

    info: OpInfo
    build: str
    module: nn.Module | None = None
    bn: nn.Module | None = None
    gemm_kind: str = ""
    weight_ch_axis: int = 0
    relu: bool = False
    add: bool = False
    target: Any = None
    is_method: bool = False
    act_args: tuple[int, ...] = ()
    weight_arg: int | None = None
    weight: torch.Tensor | None = None
    weight_key: str | None = None
    node: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The op name."""
        return self.info.name


class OpBuilder:
    """Builds op modules from plans, sharing weight quant nodes between call sites of one module.

    Args:
        qconfigs: op name -> QConfig (every planned op).
        qat_mode: ``fuse_bn`` / ``with_bn`` / ``freeze_bn`` for fused conv-bn ops.
        device: device for the new quant nodes (the model's).
    """

    def __init__(self, qconfigs: Mapping[str, QConfig], qat_mode: str, device: torch.device | None) -> None:
        self.qconfigs = qconfigs
        self.qat_mode = qat_mode
        self.device = device
        self.shared_weights: dict[str, FakeQuantize] = {}
        self.notes: list[str] = []

    def _node(self, fq: FakeQuantize) -> FakeQuantize:
        return fq.to(self.device) if self.device is not None else fq

    def _weight(self, plan: OpPlan, qconfig: QConfig, weight: torch.Tensor) -> FakeQuantize:
        _check_ch_axis(plan, qconfig, weight)
        key = plan.weight_key
        if key is not None and key in self.shared_weights:
            shared = self.shared_weights[key]
            if qconfig.weight_dtype is not None and qconfig.weight_dtype != shared.dtype:
                self.notes.append(
                    f"{plan.name}: weight dtype {qconfig.weight_dtype} ignored, the weight node is "
                    f"shared with {shared.name} ({shared.dtype})"
                )
            return shared
        fq = self._node(weight_node(qconfig, weight, plan.weight_ch_axis, f"{plan.name}.weight"))
        if key is not None:
            self.shared_weights[key] = fq
        return fq

    def _inputs(self, plan: OpPlan, qconfig: QConfig, count: int) -> list[FakeQuantize]:
        # input points always calibrate: a fixed threshold is the op's *output* range (``QConfig``)
        nodes = []
        for i in range(count):
            dtype = qconfig.input_dtype_at(i)
            fq = qconfig.activation_fake_quant(
                dtype if dtype is not None else float32, f"{plan.name}.input.{i}", output=False
            )
            nodes.append(self._node(fq))
        return nodes

    def _output(self, plan: OpPlan, qconfig: QConfig) -> FakeQuantize:
        return self._node(activation_node(qconfig, qconfig.output_dtype, f"{plan.name}.output"))

    def build(self, plan: OpPlan) -> QuantOp:
        """Build the op module of ``plan``."""
        qc = self.qconfigs[plan.name]
        info = plan.info
        if plan.build == "gemm" and plan.gemm_kind == "embedding":
            m = plan.module
            return QatEmbedding(info, m, self._weight(plan, qc, m.weight), self._output(plan, qc))
        if plan.build == "gemm":
            m = plan.module
            return QatGemm(
                info,
                m,
                plan.gemm_kind,
                self._inputs(plan, qc, 1),
                self._weight(plan, qc, m.weight),
                self._output(plan, qc),
                relu=plan.relu,
            )
        if plan.build == "convbn":
            m = plan.module
            return QatConvBn(
                info,
                m,
                plan.bn,
                plan.gemm_kind,
                self.qat_mode,
                self._inputs(plan, qc, 2 if plan.add else 1),
                self._weight(plan, qc, m.weight),
                self._output(plan, qc),
                relu=plan.relu,
                add=plan.add,
            )
        if plan.build == "module":
            module_cls = QatNormOp if isinstance(plan.module, NORM_MODULES) else QatModuleOp
            return module_cls(info, plan.module, self._output(plan, qc))
        if plan.build == "function":
            weight = None
            if plan.weight_arg is not None and plan.weight is not None:
                weight = self._weight(plan, qc, plan.weight)
            norm = not plan.is_method and plan.target in NORM_FUNCTIONS
            function_cls = QatNormFunction if norm else QatFunction
            return function_cls(
                info,
                plan.target,
                plan.is_method,
                self._output(plan, qc),
                input_quant=self._inputs(plan, qc, len(plan.act_args)),
                act_args=plan.act_args,
                weight_quant=weight,
                weight_arg=plan.weight_arg if weight is not None else None,
            )
        if plan.build == "input":
            return QatInput(info, self._output(plan, qc))
        raise ValueError(f"unknown op build kind {plan.build!r}")


def _check_ch_axis(plan: OpPlan, qconfig: QConfig, weight: torch.Tensor) -> None:
    """Reject a ``QConfig.ch_axis`` other than the op's own weight axis (never ignore it silently)."""
    axis = qconfig.ch_axis
    if axis is None:
        return
    natural, rank = plan.weight_ch_axis, weight.dim()
    if -rank <= axis < rank and axis % rank == natural % rank:
        return
    kind = plan.gemm_kind or plan.info.op_type
    raise ValueError(
        f"{plan.name}: QConfig.ch_axis={axis} is not supported: the weight of a {kind} op is quantized per "
        f"output channel, on axis {natural} (the int32 bias, BN folding and deployment need it); "
        f"allowed: None or {natural}"
    )


def matmul_module_plan(
    name: str,
    call_index: int,
    path: str,
    producers: tuple[str | None, ...],
    shapes: tuple[Any, Any],
    module: nn.Module,
    node: Any = None,
) -> OpPlan:
    """Plan a :class:`~qat_lightning.quant.nodes.attention.MatMul` module call as a matmul op.

    The op is a functional gemm whose function is the module itself (both inputs get quant points), so
    templates, the matmul rules and the model check treat it as any ``torch.matmul``.

    Args:
        name: op name (the module path, ``#k`` for the k-th extra call).
        call_index: which call of the module.
        path: the module path.
        producers: ops producing the two inputs.
        shapes: example shapes of the first input and of the output (for the MACs).
        module: the ``MatMul`` module.
        node: the fx node it replaces (fx only).
    """
    flops = function_flops("matmul", [shapes[0]], shapes[1])
    info = OpInfo(name, "matmul", OpKind.GEMM, path, call_index, producers, flops, is_matmul=True)
    return OpPlan(info, "function", module=module, target=module, act_args=(0, 1), node=node)
