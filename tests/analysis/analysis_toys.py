"""Hand-built prepared models for the analysis tests (the ops.py contract, no prepare() needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

import qat_lightning as ql
from qat_lightning.quant.ops import OpInfo, OpKind


def _fq(dtype, observer="minmax", name="", **kw):
    return ql.FakeQuantize(dtype, observer, name=name, **kw)


class QInput(nn.Module):
    """A QuantStub-like op: output quant only."""

    def __init__(self, name: str, dtype=ql.qint8, observer="minmax", **kw) -> None:
        super().__init__()
        self.op_info = OpInfo(name, "quant", OpKind.INPUT, name)
        self.input_quant = nn.ModuleList()
        self.weight_quant = None
        self.output_quant = _fq(dtype, observer, name, **kw)

    def forward(self, x):
        return self.output_quant(x)


class QLinear(nn.Module):
    """A gemm op: input, weight and output quant."""

    def __init__(
        self,
        name,
        fin,
        fout,
        in_dtype=ql.float32,
        w_dtype=ql.qint8,
        out_dtype=ql.qint8,
        observer="minmax",
        producer=None,
        out_observer=None,
        **kw,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / fin**0.5)
        self.bias = nn.Parameter(torch.randn(fout) * 0.1)
        self.op_info = OpInfo(
            name, "Linear", OpKind.GEMM, name, input_producers=(producer,), flops=fin * fout
        )
        self.input_quant = nn.ModuleList([_fq(in_dtype, observer, name)])
        self.weight_quant = _fq(w_dtype, "minmax", name, ch_axis=0, num_channels=fout)
        self.output_quant = _fq(out_dtype, out_observer or observer, name, **kw)

    def forward(self, x):
        return self.output_quant(F.linear(self.input_quant[0](x), self.weight_quant(self.weight), self.bias))


class QElementwise(nn.Module):
    """A non-gemm op (relu/add/mul/...): output quant only."""

    def __init__(self, name, fn, op_type, dtype=ql.qint8, observer="minmax", flops=0, **kw) -> None:
        super().__init__()
        self.fn = fn
        self.op_info = OpInfo(name, op_type, OpKind.OTHER, name, flops=flops)
        self.input_quant = nn.ModuleList()
        self.weight_quant = None
        self.output_quant = _fq(dtype, observer, name, **kw)

    def forward(self, *args):
        return self.output_quant(self.fn(*args))


class BrokenNet(nn.Module):
    """quant -> fc1 -> relu -> fc2 -> add(skip) -> big -> head (+ head2 for multi/dict outputs).

    Two deliberate problems:

    * ``quant`` uses a 99th-percentile observer; calibration data has a few samples scaled by 8, which
      every other (minmax) layer covers but ``quant`` clips: its calibrated range is far too small for
      such a sample (see :func:`bad_batch`), the seed's fixed-scale case;
    * ``big`` multiplies channel 0 by 200: its per-tensor int8 scale is so coarse that every other
      channel rounds to ~0 (|max| >> 10, needs int16). ``head`` reads channel 0 with a 5e-3 weight.
    """

    def __init__(self, width: int = 16, outputs: str = "single") -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.quant = QInput("quant", observer="percentile", observer_kwargs={"percentile": 99.0})
            self.fc1 = QLinear("fc1", 8, width, producer="quant")
            self.relu = QElementwise("relu", F.relu, "relu", flops=width)
            self.fc2 = QLinear("fc2", width, width, producer="relu")
            self.add = QElementwise("add", torch.add, "add", flops=width)
            gain = torch.ones(width)
            gain[0] = 200.0
            self.register_buffer("gain", gain)
            self.big = QElementwise("big", torch.mul, "mul", flops=width)
            self.head = QLinear("head", width, 4, producer="big")
            self.head2 = QLinear("head2", width, 3, producer="add")
            with torch.no_grad():
                self.head.weight[:, 0] *= 5e-3
        self.outputs = outputs

    def forward(self, x):
        x = self.quant(x)
        h = self.relu(self.fc1(x))
        y = self.add(self.fc2(h), h)
        out = self.head(self.big(y, self.gain))
        if self.outputs == "single":
            return out
        extra = self.head2(y)
        if self.outputs == "multi":
            return out, (extra, out.sum(dim=1, keepdim=True))
        return {"cls": out, "box": extra}


def calibrate(model: nn.Module, batches) -> nn.Module:
    ql.set_fake_quantize(model, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            model(b)
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    return model


LEAF_TYPES = (QInput, QLinear, QElementwise)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """fx-trace a hand-built model keeping op modules as leaves (what prepare's fx path produces)."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    gm.quant_op_order = [
        n.target
        for n in graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LEAF_TYPES)
    ]
    return gm


def data(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


BAD_INDEX = 5


def bad_batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    """Normal samples except sample ``BAD_INDEX``, scaled by 8 (clipped by the calibrated input range)."""
    x = data(n, seed)
    x[BAD_INDEX] *= 8.0
    return x


def calib_data() -> torch.Tensor:
    x = data(256)
    x[::64] *= 8.0
    return x


def calibrated(outputs: str = "single", fx_traced: bool = False) -> nn.Module:
    model = calibrate(BrokenNet(outputs=outputs), [calib_data()])
    return trace(model) if fx_traced else model


class IndexNet(nn.Module):
    """Index ops after a coarsely quantized layer: topk / argsort / argmax / sort, then a gemm on a gather."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.quant = QInput("quant", observer="fixed", observer_kwargs={"threshold": 40.0})
            self.fc = QLinear("fc", 8, 6, producer="quant")
            self.fc2 = QLinear("fc2", 3, 2, producer=None)

    def forward(self, x):
        s = self.fc(self.quant(x))
        top = torch.topk(s, 3, dim=1)
        order = s.argsort(dim=1, descending=True)
        best = torch.argmax(s, dim=1)
        vals, _ = s.sort(dim=1)
        picked = self.fc2(torch.gather(s, 1, top.indices))
        return top.values, top.indices.float(), order.float(), best.float(), vals, picked


class InplaceNet(nn.Module):
    """A graph whose float run mutates a cached activation in place (relu_ on an op output)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(2)
            self.quant = QInput("quant")
            self.fc1 = QLinear("fc1", 8, 8, producer="quant")
            self.fc2 = QLinear("fc2", 8, 4, producer="fc1")

    def forward(self, x):
        h = self.fc1(self.quant(x))
        h.relu_()
        return self.fc2(h)
