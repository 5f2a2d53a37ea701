"""quant/backends: the opt-in cpu_kernels backend (custom ops) and backend selection."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qat_lightning as ql
from qat_lightning.quant.backends import cpu_kernels
from tests.tracing import traced_ops

needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="C kernels not built")


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
    """Traced, inductor fuses the ATen formula (measured faster than the opaque op): no custom op there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, 16, requires_grad=True)
    node = ql.FakeQuantize("qint8", "minmax")
    ql.set_fake_quantize(node, "qat")
    ql.set_backend("cpu_kernels")
    try:
        with Ops() as ops:
            node(x)
        traced = traced_ops(node, x)
    finally:
        ql.set_backend("default")
    assert any("fake_quantize_cpu" in name for name in ops.names)
    assert traced and not any("fake_quantize_cpu" in name for name in traced)


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
