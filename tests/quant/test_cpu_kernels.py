"""quant/backends: the opt-in cpu_kernels backend (custom ops) and backend selection."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qat_lightning as ql
from qat_lightning.quant.backends import cpu_kernels
from tests.tracing import traced_ops

needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="C kernels not built")


class Ops(TorchDispatchMode):
    """Record the names of the aten / custom ops dispatched."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_kernels
@pytest.mark.parametrize("ch_axis", [-1, 1])
def test_custom_op_passes_opcheck(ch_axis) -> None:
    x = torch.randn(3, 4, 5, requires_grad=True)
    scale = torch.full((4,) if ch_axis >= 0 else (1,), 0.05)
    torch.library.opcheck(torch.ops.qat_lightning.fake_quantize_cpu.default, (x, scale, -128, 127, ch_axis))


@needs_kernels
def test_backend_equals_default_path_and_compiles() -> None:
    x = torch.randn(8, 16) * 3
    node = ql.FakeQuantize("qint8", "minmax")
    ql.set_fake_quantize(node, "calibration")
    node(x)
    ql.set_fake_quantize(node, "validation")
    ref = node(x)
    ql.set_backend("cpu_kernels")
    try:
        assert ql.get_backend() == "cpu_kernels"
        assert torch.equal(node(x), ref)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(node, fullgraph=True)(x), ref)
    finally:
        ql.set_backend("default")


@needs_kernels
def test_backend_runs_in_eager_mode_and_traced_code_runs_the_formula() -> None:
    """Eager: the kernels, without torch.library's dispatch (measured: 0.04-0.05 of a QAT step) or the
    formula. Traced: inductor fuses the ATen formula (measured faster than the opaque op), no custom op."""
    x = torch.randn(8, 16, requires_grad=True)
    node = ql.FakeQuantize("qint8", "minmax")
    ql.set_fake_quantize(node, "qat")
    ql.set_backend("cpu_kernels")
    try:
        with Ops([]) as ops:
            node(x)
        traced = traced_ops(node, x)
    finally:
        ql.set_backend("default")
    assert ops.names and not any("fake_quantize_cpu" in name or "round" in name for name in ops.names)
    assert traced and not any("fake_quantize_cpu" in name for name in traced)


@needs_kernels
@pytest.mark.parametrize("ch_axis", [-1, 1])
def test_registered_ops_and_the_eager_path_agree(ch_axis) -> None:
    """The custom ops (for traced code) and the eager autograd.Function: same values, masks, gradients."""
    x = torch.randn(3, 40, 5) * 3
    x[0, 0, 0], x[1, 2, 3], x[2, 5, 1] = float("nan"), float("inf"), 0.05 * 127.5  # a .5 boundary
    scale = torch.tensor([0.05]) if ch_axis < 0 else torch.rand(40) * 0.1 + 0.01
    grad = torch.randn_like(x)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    if ch_axis < 0:
        out_op, _, extremes_op = torch.ops.qat_lightning.fake_quantize_cpu_with_extremes(a, scale, -128, 127)
        extremes: list[float] = []
        out_eager = cpu_kernels._EagerFakeQuantize.apply(b, scale, -128, 127, -1, extremes)
        assert _bitwise_equal(extremes_op, torch.tensor(extremes))
    else:
        out_op = torch.ops.qat_lightning.fake_quantize_cpu(a, scale, -128, 127, ch_axis)[0]
        out_eager = cpu_kernels._EagerFakeQuantize.apply(b, scale, -128, 127, ch_axis, None)
    out_op.backward(grad)
    out_eager.backward(grad)
    assert _bitwise_equal(out_op, out_eager) and _bitwise_equal(a.grad, b.grad)
    assert a.grad[0, 0, 0] == 0 and a.grad[1, 2, 3] == 0  # NaN and inf: no gradient


def test_backend_selection_errors() -> None:
    with pytest.raises(ValueError, match="allowed: default, cpu_kernels"):
        ql.set_backend("gpu")
    env = dict(os.environ, QAT_LIGHTNING_NO_KERNELS="1", PYTHONPATH=os.getcwd())
    code = (
        "import qat_lightning as ql\n"
        "try:\n    ql.set_backend('cpu_kernels')\nexcept RuntimeError as e:\n    print('refused', e)\n"
        "print(ql.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "refused" in out.stdout and out.stdout.strip().endswith("default")


# ------------------------------------------------------------------------------------------ QAT weights
@needs_kernels
@pytest.mark.parametrize("with_fold", [False, True])
def test_weight_op_passes_opcheck(with_fold) -> None:
    w = torch.randn(6, 3, 3, 3)
    fold = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.25, 1.5]) if with_fold else None
    op = torch.ops.qat_lightning.fake_quantize_weight_cpu.default
    torch.library.opcheck(op, (w, fold, torch.ones(6), -128, 127, 2.0**-24))


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN equal to NaN."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _weight_node(observer: str, channels: int) -> ql.FakeQuantize:
    node = ql.FakeQuantize("qint8", observer, ch_axis=0, num_channels=channels)
    ql.set_fake_quantize(node, "calibration")
    node(torch.randn(channels, 5) * 2)
    ql.set_fake_quantize(node, "qat")
    return node


@needs_kernels
@pytest.mark.parametrize("observer", ["minmax", "moving_minmax"])
@pytest.mark.parametrize("with_fold", [False, True])
def test_weight_step_equals_the_default_path_bit_for_bit(observer, with_fold) -> None:
    """Value, gradient, scale and every observer buffer, a NaN row (keeps its old scale) included."""
    from qat_lightning.quant.nodes.weight_quant import quantize_weight

    torch.manual_seed(0)
    weight = (torch.randn(8, 4, 3, 3) * torch.logspace(-3, 1, 8).reshape(-1, 1, 1, 1)).requires_grad_()
    fold = torch.tensor([0.5, -2.0, 1.0, 3.0, -0.25, 1.5, 1e-3, 7.0]) if with_fold else None
    node = _weight_node(observer, 8)
    nodes = {"default": node, "cpu_kernels": copy.deepcopy(node)}
    grads = {}
    for step in range(3):
        w = weight.detach().clone()
        if step == 2:
            w[3, 1, 0, 2] = float("nan")
        values, names = {}, []
        for name, node in nodes.items():
            ql.set_backend(name)
            try:
                leaf = w.clone().requires_grad_()
                with Ops(names if name == "cpu_kernels" else []):
                    values[name] = quantize_weight(node, leaf, fold)
                values[name].backward(torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape))
                grads[name] = leaf.grad
            finally:
                ql.set_backend("default")
        assert names and not any(op in name for op in (*BOOKKEEPING_OPS, "round") for name in names), names
        assert _bitwise_equal(values["default"], values["cpu_kernels"]), step
        assert torch.equal(grads["default"], grads["cpu_kernels"])
        ref, got = nodes["default"].state_dict(), nodes["cpu_kernels"].state_dict()
        for key in ref:
            assert _bitwise_equal(ref[key], got[key]), key
        ref_nf = nodes["default"].observer.nonfinite_batches
        assert torch.equal(ref_nf, nodes["cpu_kernels"].observer.nonfinite_batches)
    assert int(nodes["cpu_kernels"].observer.nonfinite_batches) == 1


@needs_kernels
def test_backend_qat_step_of_a_bn_folded_cnn_equals_the_default_path() -> None:
    """Through prepare: conv-bn (folded weights), linear; QAT forward + backward + SGD, 2 steps."""
    from tests.models import TinyResNet

    torch.manual_seed(0)
    example = TinyResNet.example_inputs()
    base = ql.prepare(TinyResNet(), example)
    ql.set_fake_quantize(base, "calibration")
    with torch.no_grad():
        base(*example)
    ql.set_fake_quantize(base, "qat")
    models = {"default": base, "cpu_kernels": copy.deepcopy(base)}
    calls = []
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ql.set_backend(name)
        try:
            with Ops(calls if name == "cpu_kernels" else []):
                model(*example)
            for _ in range(2):
                loss = model(*example).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            ql.set_backend("default")
    # the ranges and fake quants of weights and activations came from the kernels: no ATen range or round
    assert calls and not any(op in c for c in calls for op in ("round", "aminmax", "amin", "amax"))
    ref, got = models["default"].state_dict(), models["cpu_kernels"].state_dict()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


# ------------------------------------------------------------------- activations: range in the same read
@needs_kernels
def test_extremes_op_passes_opcheck() -> None:
    x = torch.randn(4, 100, requires_grad=True)
    op = torch.ops.qat_lightning.fake_quantize_cpu_with_extremes.default
    torch.library.opcheck(op, (x, torch.tensor([0.05]), -128, 127))


BOOKKEEPING_OPS = (
    "aminmax", "amin", "amax", "lerp", "minimum", "maximum", "where", "masked_fill", "logical_or"
)  # fmt: skip
"""ATen ops of a QAT node's range and bookkeeping, none of which the backend dispatches."""


@needs_kernels
@pytest.mark.parametrize("observer", ["minmax", "moving_minmax", "mse"])
@pytest.mark.parametrize(("dtype", "averaging"), [("qint8", 0.01), ("qint16", 0.75)])
def test_qat_node_with_its_range_from_the_kernel_equals_the_default_path(observer, dtype, averaging) -> None:
    """Value, gradient, scale and observer state over batches with NaN and inf (skipped and counted).

    ``averaging`` 0.75 takes the other branch of ``torch.lerp``; the bookkeeping ran in C (no ATen op).
    """
    node = ql.FakeQuantize(dtype, observer, qat_averaging_constant=averaging)
    ql.set_fake_quantize(node, "calibration")
    node(torch.randn(1000))
    ql.set_fake_quantize(node, "qat")
    nodes = {"default": node, "cpu_kernels": copy.deepcopy(node)}
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(3, 5000, generator=gen) * (1 + step)
        if step == 2:
            x[1, 7] = float("nan")
        if step == 3:
            x[0, 3] = float("inf")
        got, grads, names = {}, {}, []
        for name, n in nodes.items():
            ql.set_backend(name)
            try:
                leaf = x.clone().requires_grad_()
                with Ops(names if name == "cpu_kernels" else []):
                    got[name] = n(leaf)
                got[name].backward(torch.ones_like(x))
                grads[name] = leaf.grad
            finally:
                ql.set_backend("default")
        assert names and not any(op in name for op in (*BOOKKEEPING_OPS, "round") for name in names)
        assert _bitwise_equal(got["default"], got["cpu_kernels"]), step
        assert torch.equal(grads["default"], grads["cpu_kernels"]), step
        ref, new = nodes["default"].state_dict(), nodes["cpu_kernels"].state_dict()
        for key in ref:
            assert torch.equal(ref[key], new[key]), (step, key)
        ref_nf = nodes["default"].observer.nonfinite_batches
        assert torch.equal(ref_nf, nodes["cpu_kernels"].observer.nonfinite_batches)
    assert int(nodes["cpu_kernels"].observer.nonfinite_batches) == 2


_ISA_CHECK = """
import sys, torch, qat_lightning as ql
from qat_lightning.quant.backends import cpu_kernels
from qat_lightning.quant.nodes.functional import _FakeQuantizeFormula
assert cpu_kernels._KERNELS.BIT_KERNELS_ISA == sys.argv[1], cpu_kernels._KERNELS.BIT_KERNELS_ISA
gen = torch.Generator().manual_seed(0)
for n in (1, 15, 17, 64, 1000, 70001):
    x = torch.randn(n, generator=gen) * 4
    x[:: 7] = (torch.arange(0, n, 7) % 5 - 2) * 0.05 + 0.025  # exact .5 boundaries of the scale 0.05
    if n > 20:
        x[3], x[11] = float("nan"), float("inf")
    scale = torch.tensor([0.05])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, _, ext = torch.ops.qat_lightning.fake_quantize_cpu_with_extremes(a, scale, -128, 127)
    ref = _FakeQuantizeFormula.apply(b, scale.reshape(()), -128, 127)
    assert torch.allclose(got, ref, rtol=0, atol=0, equal_nan=True), n
    g = torch.randn(n, generator=gen)
    got.backward(g)
    ref.backward(g)
    assert torch.equal(a.grad, b.grad), n
    finite = x[torch.isfinite(x)]
    want = [float("nan")] * 2 if finite.numel() < n else [float(x.min()), float(x.max())]
    assert torch.allclose(ext, torch.tensor(want), equal_nan=True), (n, ext, want)
print("ok")
"""


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_capped_instruction_sets_equal_the_formula(isa) -> None:
    """``QAT_LIGHTNING_KERNEL_ISA`` caps the bit-mask kernels: every variant equals the ATen formula."""
    import torch.backends.cpu

    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2")
    env = dict(os.environ, QAT_LIGHTNING_KERNEL_ISA=isa, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK, isa], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@needs_kernels
@pytest.mark.parametrize("per_channel", [False, True])
def test_buffers_written_by_the_kernels_move_their_versions(per_channel) -> None:
    """The C bookkeeping writes the node's buffers through their addresses; autograd still sees the change,
    so a graph that saved the scale raises instead of giving a silently wrong gradient."""
    from qat_lightning.quant.nodes.weight_quant import quantize_weight

    node = _weight_node("minmax", 4) if per_channel else ql.FakeQuantize("qint8", "minmax")
    if not per_channel:
        ql.set_fake_quantize(node, "calibration")
        node(torch.randn(100))
        ql.set_fake_quantize(node, "qat")
    factor = torch.ones_like(node.scale, requires_grad=True)
    saved = (node.scale * factor).square().sum()  # saves the scale for backward
    before = {key: t._version for key, t in node.named_buffers()}
    ql.set_backend("cpu_kernels")
    try:
        x = torch.randn(4, 5, requires_grad=True)
        with Ops(names := []):
            quantize_weight(node, x) if per_channel else node(x)
    finally:
        ql.set_backend("default")
    assert names and not any("lerp" in name or "minimum" in name for name in names)  # the C bookkeeping ran
    moved = {key for key, t in node.named_buffers() if t._version != before[key]}
    assert {"scale", "scale_ready", "observer.min_val", "observer.max_val", "observer.num_batches"} <= moved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@needs_kernels
@pytest.mark.parametrize("case", ["drops NaN/inf", "int32 counter"])
def test_other_rules_or_buffers_leave_the_bookkeeping_to_the_default_path(case) -> None:
    """An observer dropping NaN/inf follows other rules, and the C code writes only buffers of the dtypes it
    knows (it gets their addresses): both run the ATen bookkeeping, with the same results."""
    node = ql.FakeQuantize("qint8", "minmax", ignore_nonfinite=case == "drops NaN/inf")
    ql.set_fake_quantize(node, "calibration")
    node(torch.randn(100))
    ql.set_fake_quantize(node, "qat")
    if case == "int32 counter":
        node.observer.num_batches = node.observer.num_batches.int()
    reference = copy.deepcopy(node)
    x = torch.randn(3, 50)
    x[1, 2] = float("nan") if case == "drops NaN/inf" else 1.0
    ql.set_backend("cpu_kernels")
    try:
        with Ops(names := []):
            got = node(x)
    finally:
        ql.set_backend("default")
    assert any("lerp" in name for name in names)
    assert _bitwise_equal(got, reference(x)) and torch.equal(node.scale, reference.scale)
    assert torch.equal(node.observer.num_batches, reference.observer.num_batches)


@needs_kernels
@pytest.mark.parametrize("averaging", [0.01, 0.5, 0.75])
def test_moving_scale_equals_the_default_path_over_many_batches(averaging) -> None:
    """The scale's float32 ``lerp`` in C rounds as ATen's in both branches (weight below 0.5 or not)."""
    node = ql.FakeQuantize("qint8", "moving_minmax", qat_averaging_constant=averaging)
    ql.set_fake_quantize(node, "calibration")
    node(torch.randn(64))
    ql.set_fake_quantize(node, "qat")
    reference = copy.deepcopy(node)
    gen = torch.Generator().manual_seed(1)
    batches = torch.randn(300, 32, generator=gen) * torch.logspace(-2, 2, 300).reshape(-1, 1)
    got, ref = [], []
    for x in batches:
        ql.set_backend("cpu_kernels")
        try:
            got.append(torch.cat([node(x).detach(), node.scale.reshape(1)]))
        finally:
            ql.set_backend("default")
        ref.append(torch.cat([reference(x).detach(), reference.scale.reshape(1)]))
    assert torch.equal(torch.stack(got), torch.stack(ref))
    assert torch.equal(node.observer.avg_min, reference.observer.avg_min)
    assert torch.equal(node.observer.avg_max, reference.observer.avg_max)
