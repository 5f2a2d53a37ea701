"""quant/backends/_kernels.c: the fused fake-quant kernels against the ATen formulas and torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qat_lightning.quant.dtypes import qint8, qint16
from qat_lightning.quant.nodes import functional as qf
from qat_lightning.quant.nodes.functional import fake_quantize

needs_kernels = pytest.mark.skipif(not qf.kernels_available(), reason="fused kernels not built")


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads={t}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def run_both(monkeypatch, x, scale, dtype, ch_axis, upstream):
    """Forward and gradient with the kernels, then with the ATen formulas (kernels switched off)."""
    results = []
    for kernels in (qf._KERNELS, None):
        monkeypatch.setattr(qf, "_KERNELS", kernels)
        leaf = x.detach().clone().requires_grad_(True)
        out = fake_quantize(leaf, scale, dtype, ch_axis)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        results.append((out.detach(), grad))
    return results


def test_kernels_are_built_by_the_install() -> None:
    if os.environ.get("QAT_LIGHTNING_NO_KERNELS"):
        pytest.skip("kernels switched off by QAT_LIGHTNING_NO_KERNELS")
    assert qf.kernels_available(), "setup.py did not build quant.backends._kernels (no C compiler?)"


@needs_kernels
@pytest.mark.parametrize(
    ("shape", "ch_axis"),
    [
        ((4, 8, 33, 65), None),  # per tensor, numel not a multiple of 64: uneven thread split
        ((4, 8, 33, 65), 1),
        ((4, 8, 33, 65), 3),  # last axis: rows of one element
        ((256, 64, 3, 3), 0),  # a conv weight
        ((5, 7), None),  # too small to split
        ((3, 1, 9), 1),  # one channel
    ],
)
@pytest.mark.parametrize("dtype", [qint8, qint16], ids=str)
def test_kernel_is_bit_identical_to_aten(shape, ch_axis, dtype, threads, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 4
    x.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -0.0])
    channels = 1 if ch_axis is None else shape[ch_axis]
    scale = torch.rand(channels, generator=gen) * (8 / dtype.qmax) + 1e-4
    scale = scale.reshape(()) if ch_axis is None else scale
    upstream = torch.randn(shape, generator=gen)
    (out_k, grad_k), (out_a, grad_a) = run_both(monkeypatch, x, scale, dtype, ch_axis, upstream)
    assert torch.equal(out_k.nan_to_num(7.0), out_a.nan_to_num(7.0))
    assert torch.equal(out_k.isnan(), out_a.isnan())
    assert torch.equal(grad_k, grad_a)


@needs_kernels
def test_kernel_matches_torch_builtin_on_power_of_two_scale(threads) -> None:
    x = torch.randn(3, 16, 40, 40, generator=torch.Generator().manual_seed(1)) * 3
    leaf = x.clone().requires_grad_(True)
    ours = fake_quantize(leaf, 2.0**-4, qint8)
    ref_leaf = x.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(ref_leaf, 2.0**-4, 0, -128, 127)
    upstream = torch.randn(x.shape)
    assert torch.equal(ours, ref)
    (grad,) = torch.autograd.grad(ours, leaf, upstream)
    assert torch.equal(grad, torch.autograd.grad(ref, ref_leaf, upstream)[0])


@needs_kernels
@pytest.mark.parametrize("numel", [8 * 16, 1000, 131072 + 77])  # whole bytes, a partial byte, two threads
def test_backward_keeps_a_bit_mask_not_the_input(numel, threads) -> None:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(2)).mul_(2).requires_grad_(True)
    out = fake_quantize(x, 0.01, qint8)
    (saved,) = out.grad_fn.saved_tensors
    assert saved.dtype == torch.uint8 and saved.numel() == (numel + 7) // 8  # one bit per element
    bits = (saved.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # little-endian bit order
    v = x.detach() * torch.tensor(0.01).reciprocal()
    inside = (v >= -128.5) & (v < 127.5)  # qmin <= round(v) <= qmax
    assert torch.equal(bits.reshape(-1)[:numel].bool(), inside)
    upstream = torch.randn(numel)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grad, torch.where(inside, upstream, 0.0))


@needs_kernels
def test_per_channel_keeps_a_byte_mask() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    out = fake_quantize(x, torch.full((6,), 0.01), qint8, 1)
    (saved,) = out.grad_fn.saved_tensors
    assert saved.dtype == torch.uint8 and saved.shape == x.shape


@needs_kernels
def test_no_mask_without_grad() -> None:
    with torch.no_grad():
        out = fake_quantize(torch.randn(8, 16, requires_grad=True), 0.01, qint8)
    assert out.grad_fn is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(6, 10).t(),  # non-contiguous
        lambda: torch.randn(6, 10, dtype=torch.float64),  # another dtype
    ],
    ids=["transposed", "float64"],
)
def test_inputs_the_kernel_does_not_take_use_the_formulas(make) -> None:
    x = make()
    leaf = x.clone().requires_grad_(True)
    out = fake_quantize(leaf, 0.02, qint8)
    reference = (x / 0.02).round().clamp(-128, 127) * 0.02
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert torch.equal(leaf.grad, ((x / 0.02).abs() < 127.5).to(x.dtype))


def test_expanded_upstream_gradient() -> None:
    x = torch.randn(5, 6, requires_grad=True)
    fake_quantize(x * 100, 0.1, qint8).sum().backward()  # the gradient of sum() arrives expanded
    v = (x.detach() * 100) * torch.tensor(0.1).reciprocal()
    assert torch.equal(x.grad, torch.where((v >= -128.5) & (v < 127.5), 100.0, 0.0))


def test_environment_switch_turns_the_kernels_off() -> None:
    code = "from qat_lightning.quant.nodes import functional as f; print(f.kernels_available())"
    env = dict(os.environ, QAT_LIGHTNING_NO_KERNELS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_ISA_CHECK = """
import torch
from qat_lightning.quant.nodes import functional as qf
from qat_lightning.quant.backends import _kernels
gen = torch.Generator().manual_seed(5)
for threads in (1, 2):
    torch.set_num_threads(threads)
    for n in (7, 16, 100, 131072 + 77):
        x = torch.randn(n, generator=gen) * 3
        x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
        upstream = torch.randn(n, generator=gen)
        for relu in (False, True):
            results = []
            for kernels in (qf._KERNELS, None):
                qf._KERNELS = kernels
                leaf = x.clone().requires_grad_(True)
                src = torch.relu(leaf) if relu and kernels is None else leaf * 1.0
                if relu and kernels is not None:
                    with torch.no_grad():
                        src.relu_()
                fused = relu and kernels is not None
                out = qf._FakeQuantizeSTE.apply(src, torch.tensor(0.02), -128, 127, fused)
                results.append((out.detach(), torch.autograd.grad(out, leaf, upstream)[0]))
            qf._KERNELS = _kernels
            (ok, gk), (oa, ga) = results
            assert torch.equal(ok.isnan(), oa.isnan()), (n, relu)
            assert torch.equal(ok.nan_to_num(9.0), oa.nan_to_num(9.0)), (n, relu)
            assert torch.equal(gk, ga), (n, relu)
print(_kernels.BIT_KERNELS_ISA)
"""


@needs_kernels
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_bit_mask_kernel_matches_the_aten_formulas(isa) -> None:
    """The per-CPU variants of the bit-mask rows (chosen at import) against the ATen formulas."""
    env = dict(os.environ, QAT_LIGHTNING_KERNEL_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    chosen = out.stdout.strip()
    if chosen != isa:
        pytest.skip(f"this CPU has no {isa}; ran {chosen}")


@needs_kernels
def test_nothing_clipped_keeps_no_mask_and_passes_the_gradient_through(threads) -> None:
    x = torch.rand(131072 + 5, generator=torch.Generator().manual_seed(4)).sub_(0.5).requires_grad_(True)
    out = fake_quantize(x, 0.01, qint8)  # |x / 0.01| <= 50: nothing clipped
    assert out.grad_fn.saved_tensors == (None,)
    upstream = torch.randn(x.shape)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grad, upstream)
    x.detach()[7] = 5.0  # one clipped value: the bit mask is kept
    out = fake_quantize(x, 0.01, qint8)
    (saved,) = out.grad_fn.saved_tensors
    assert saved is not None and saved.numel() == (x.numel() + 7) // 8
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert grad[7] == 0 and torch.equal(grad[:7], upstream[:7])
