"""The quant node on the path users train on: compile, export, meta tensors, half precision, host syncs.

Device-generic tests run on ``cpu`` and ``cuda`` (skipped without a GPU).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import qat_lightning as ql
from qat_lightning.quant.nodes.fp16_norm import fp16_layer_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import TinyEncoder, TinyResNet  # noqa: E402

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
STATES = ["qat", "calibration", "validation", "float"]
_SYNC_OPS = {"_local_scalar_dense", "item", "equal", "is_nonzero", "_assert_async", "nonzero"}


def prepared(model_cls: type, observer: str = "minmax", device: str = "cpu") -> tuple[torch.nn.Module, tuple]:
    """A calibrated prepared tiny model (range observers: calibration is sync-free and compiles too)."""
    torch.manual_seed(0)
    model = model_cls()
    example = model_cls.example_inputs()
    p = ql.prepare(model, example, ql.get_qconfig(observer=observer)).to(device)
    example = tuple(t.to(device) for t in example)
    ql.set_fake_quantize(p, "calibration")
    with torch.no_grad():
        p(*example)
    return p, example


class _SyncCounter(TorchDispatchMode):
    """Count the aten ops that copy a device value to the host (``.item()``, ``bool(t)``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.overloadpacket.__name__ in _SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


class _PointerCounter(TorchFunctionMode):
    """Count ``data_ptr()`` calls on tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if getattr(func, "__name__", "") == "data_ptr":
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_cls", [TinyResNet, TinyEncoder])
def test_no_host_sync_in_any_state(model_cls, device) -> None:
    """A QAT step (forward + backward) and the other states' forwards read nothing back to the host."""
    p, example = prepared(model_cls, device=device)
    for state in STATES:
        ql.set_fake_quantize(p, state)
        with _SyncCounter() as syncs, _PointerCounter() as pointers:
            out = p(*example)
            if state == "qat":
                out.square().mean().backward()
        assert syncs.syncs == [], (state, syncs.syncs)
        assert pointers.calls == 0, state


class _OpRecorder(TorchDispatchMode):
    """Record every aten op dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_qat_forward_of_a_node_dispatches_a_lean_op_list() -> None:
    """A per-tensor QAT forward: one range reduction, the 5-op formula, and at most 17 ops on 0-d tensors.

    Each op is a kernel launch on a GPU and a dispatcher call on the CPU, run cold between two big ops.
    """
    node = ql.FakeQuantize("qint8", "minmax")
    ql.set_fake_quantize(node, "calibration")
    node(torch.randn(64))
    ql.set_fake_quantize(node, "qat")
    x = torch.randn(64, requires_grad=True)
    with _OpRecorder() as rec:
        node(x)
    assert [op for op in rec.ops if op in ("aminmax", "amin", "amax")] == ["aminmax"]
    formula = ["reciprocal", "mul", "round_", "clamp_", "mul_"]
    assert [op for op in rec.ops if op in formula] == formula
    assert len(rec.ops) <= 23, rec.ops
    assert not {"detach", "view", "reshape", "copy_", "all"} & set(rec.ops), rec.ops


@pytest.mark.parametrize("state", STATES)
def test_meta_tensors_in_every_state(state) -> None:
    p, example = prepared(TinyResNet)
    meta = copy.deepcopy(p).to("meta")
    ql.set_fake_quantize(meta, state)
    out = meta(torch.empty(example[0].shape, device="meta"))
    assert out.device.type == "meta" and out.shape == p(*example).shape


@pytest.mark.parametrize("observer", ["minmax", "kl"])
def test_a_meta_node_changes_its_dtype(observer) -> None:
    """A shape-only copy: no statistics to read, nothing to compute (it read them with ``.item()``)."""
    node = ql.FakeQuantize("qint8", observer).to("meta")
    node.dtype = ql.qint16
    assert node.dtype is ql.qint16 and node.scale.is_meta
    ql.set_fake_quantize(node, "validation")
    assert node(torch.empty(3, 5, device="meta")).shape == (3, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_node_quantizes_in_float32(dtype, device) -> None:
    fq = ql.FakeQuantize("qint8", "minmax").to(device)
    ql.set_fake_quantize(fq, "calibration")
    x = (torch.randn(4, 33, device=device) * 3).to(dtype)
    fq(x)
    for state in ("validation", "qat"):
        ql.set_fake_quantize(fq, state)
        before = fq.scale.clone()
        leaf = x.clone().requires_grad_(True)
        out = fq(leaf)
        out.float().sum().backward()
        assert out.dtype == dtype and fq.scale.dtype == torch.float32
        ref = ql.fake_quantize(x.float(), before, "qint8").to(
            dtype
        )  # the fp32 fake quant, in the input dtype
        assert torch.equal(out, ref), state
        assert leaf.grad.dtype == dtype


def test_half_precision_model_qat_trains() -> None:
    p, example = prepared(TinyResNet)
    for dtype in (torch.bfloat16, torch.float16):
        model = copy.deepcopy(p).to(dtype)
        ql.set_fake_quantize(model, "qat")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(2):
            loss = model(example[0].to(dtype)).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert torch.isfinite(loss)
        assert all(n.scale.dtype == torch.float32 for _, n in ql.iter_fake_quantize(model))


def test_autocast_runs_the_fake_quant_in_float32() -> None:
    p, example = prepared(TinyEncoder)
    ql.set_fake_quantize(p, "validation")
    node = next(n for _, n in ql.iter_fake_quantize(p) if n.ch_axis is None and n.dtype.is_integer)
    seen = []
    node.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p(*example)
    x, out = seen[-1]
    assert out.dtype == x.dtype
    assert torch.equal(out, ql.fake_quantize(x.float(), node.scale, node.dtype).to(x.dtype))


# ------------------------------------------------------------------------------------------ torch.compile
def _explain(model: torch.nn.Module, example: tuple) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(*example).graph_break_count


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", [TinyResNet, TinyEncoder])
def test_compile_fullgraph_every_state_matches_eager(model_cls) -> None:
    """inductor, fullgraph, every state (QAT forward + backward too): same values as eager, no break."""
    p, example = prepared(model_cls)
    eager = copy.deepcopy(p)
    torch._dynamo.reset()
    compiled = torch.compile(p, fullgraph=True)
    for state in ("validation", "qat", "calibration", "float", "qat"):
        ql.set_fake_quantize(p, state)
        ql.set_fake_quantize(eager, state)
        x = example[0] * 1.5
        out_c, out_e = compiled(x), eager(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        if state == "qat":
            out_c.square().mean().backward()
            out_e.square().mean().backward()
            # inductor reorders float sums; gradients that are mathematically 0 (a key bias under
            # softmax) are rounding noise: compare against the model's gradient scale
            gmax = max(float(b.grad.abs().max()) for b in eager.parameters())
            for (name, a), b in zip(p.named_parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-2 * gmax, msg=name)
        for (name, a), b in zip(p.named_buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0, msg=name)  # scales and statistics move alike
    assert _explain(p, example) == 0


@pytest.mark.slow
def test_compiled_bfloat16_qat_is_eager_bit_for_bit_when_inductor_rounds_as_eager() -> None:
    """bf16 QAT compiled: inductor keeps pointwise chains in float32 unless it emulates eager's casts.

    With ``emulate_precision_casts`` the node sees eager's values: the forward is bit for bit eager's.
    """
    p, example = prepared(TinyEncoder)
    p = p.to(torch.bfloat16)
    ql.set_fake_quantize(p, "qat")
    eager = copy.deepcopy(p)
    x = example[0].to(torch.bfloat16) * 1.5
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True):
        out_c = torch.compile(p, fullgraph=True)(x)
    out_e = eager(x)
    assert out_c.dtype == torch.bfloat16 and torch.equal(out_c, out_e)
    out_c.float().square().mean().backward()
    out_e.float().square().mean().backward()
    gmax = max(float(b.grad.float().abs().max()) for b in eager.parameters())
    for (name, a), b in zip(p.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=0, atol=1e-2 * gmax, msg=name)
    for (name, a), b in zip(p.named_buffers(), eager.buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name  # float32 scales, moved alike


@pytest.mark.slow
def test_flipping_states_does_not_recompile_after_each_first_compile() -> None:
    p, example = prepared(TinyResNet)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(p, fullgraph=True)
    for state in STATES:  # first compile of each state
        ql.set_fake_quantize(p, state)
        compiled(*example)
    frames = counts["stats"]["unique_graphs"]
    for state in STATES * 2:
        ql.set_fake_quantize(p, state)
        compiled(*example)
    assert counts["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("state", ["validation", "qat"])
def test_compiled_float16_node_rounds_as_eager(state) -> None:
    """inductor drops a fused float32 -> float16 -> float32 round trip: the fake cast must survive it."""
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    node = ql.FakeQuantize("float16")
    ql.set_fake_quantize(node, state)
    torch._dynamo.reset()
    out = torch.compile(node, fullgraph=True)(x)
    assert torch.equal(out, x.half().float()) and not torch.equal(out, x)


def test_compiled_fp16_layer_norm_simulation_stays_on_the_float16_grid() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 64) * 3 + 1.0, torch.randn(64), torch.randn(64)
    eager = fp16_layer_norm(x, 64, w, b, auto_scale=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fp16_layer_norm(t, 64, w, b, auto_scale=False), fullgraph=True)(x)
    assert torch.equal(compiled, eager) and torch.equal(compiled, compiled.half().float())


def test_float16_fake_cast_of_bfloat16_saturates_in_float32() -> None:
    """bf16 rounds 65504 up to 65536 (inf in float16): the clamp runs in float32, then back to bf16."""
    x = torch.tensor([99840.0, -99840.0, 65536.0, 70144.0, 1.5]).bfloat16()
    want = x.float().clamp(-65504, 65504).half().bfloat16()
    assert torch.equal(ql.fake_quantize(x, 1.0, ql.float16), want)
    node = ql.FakeQuantize("float16").bfloat16()
    ql.set_fake_quantize(node, "validation")
    assert torch.equal(node(x), want) and bool(torch.isfinite(node(x)).all())


@pytest.mark.slow
def test_compiled_histogram_calibration_takes_a_new_batch_size() -> None:
    """A second batch size makes dynamo trace sizes symbolically: the subsample step must still trace."""
    torch.manual_seed(0)
    node = ql.FakeQuantize("qint8", "kl")
    eager = copy.deepcopy(node)
    ql.set_fake_quantize(node, "calibration")
    ql.set_fake_quantize(eager, "calibration")
    torch._dynamo.reset()
    compiled = torch.compile(node, fullgraph=True)
    for rows in (1000, 700):
        x = torch.randn(rows, 64) * 3
        assert torch.equal(compiled(x), eager(x))
    for (name, a), b in zip(node.named_buffers(), eager.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_export_in_validation_runs_and_matches() -> None:
    p, example = prepared(TinyResNet)
    p.eval()
    ql.set_fake_quantize(p, "validation")
    program = torch.export.export(p, example)
    x = example[0] * 0.7
    assert torch.equal(program.module()(x), p(x))


@pytest.mark.parametrize("model_cls", [TinyResNet, TinyEncoder])
def test_export_unflatten_of_an_fx_prepared_model_matches(model_cls: type) -> None:
    """The prepared graph carries no stale module stacks of the float trace (unflatten returned 6 outputs)."""
    p, example = prepared(model_cls)
    p.eval()
    ql.set_fake_quantize(p, "validation")
    unflat = torch.export.unflatten(torch.export.export(p, example))
    assert torch.equal(unflat(*example), p(*example))
    assert all("nn_module_stack" not in n.meta for n in p.graph.nodes)


class _SharedReLU(torch.nn.Module):
    """One ReLU module called twice (eager prepare: a second call site ``relu#1`` with its own nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.fc(x)) + self.relu(x))


def test_export_unflatten_of_an_eager_model_with_a_shared_module_runs_each_call_site() -> None:
    """Unflatten ran the first call's nodes for the second call (0.009 off): the sites have other scales."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    p = ql.prepare(_SharedReLU(), (x,), method="eager")
    ql.calibrate(p, [x])
    p.eval()
    sites = dict(p.named_modules())
    assert not torch.equal(sites["relu"].output_quant.scale, sites["relu#1"].output_quant.scale)
    program = torch.export.export(p, (x,))
    assert torch.equal(program.module()(x), p(x))
    assert torch.equal(torch.export.unflatten(program)(x), p(x))


def test_explain_finds_no_graph_break_in_validation_and_qat() -> None:
    p, example = prepared(TinyEncoder)
    for state in ("validation", "qat", "float"):
        ql.set_fake_quantize(p, state)
        assert _explain(p, example) == 0, state
