"""Benchmark: qat_lightning's fake quant against torch's built-in fake quant and a plain copy.

Run from the repository root::

    python benchmarks/fake_quant.py            # ratios (the headline)
    python benchmarks/fake_quant.py --ms       # plus absolute medians in milliseconds
    python benchmarks/fake_quant.py --clock cpu   # CPU time of this process (for a busy, shared machine)

For each thread count (``torch.set_num_threads``), dtype (qint8, qint16) and granularity (per tensor,
per channel on axis 1) it times, on one float32 activation-sized tensor:

* ``fwd+bwd``: forward and backward (``torch.autograd.grad`` with a fixed upstream gradient) of
  ``quant.nodes.functional.fake_quantize`` ("ours"), of ``torch.fake_quantize_per_tensor_affine``
  / ``torch.fake_quantize_per_channel_affine`` ("builtin", zero point 0, same integer range) and of a
  copy floor (``x.clone()`` forward, ``grad.clone()`` backward: the least any out-of-place fake quant
  must do in each direction);
* ``fwd``: the forward alone on a tensor without grad, against ``x.clone()``.

The contenders of one case are interleaved run by run (so drifts hit all of them alike), after a
warm-up; the figure per contender is the median over ``--runs`` runs. Printed are ratios of medians:
``ours/clone``, ``builtin/clone`` (cost over the copy floor) and ``builtin/ours`` (speed-up; > 1 means
ours is faster). Before timing, the script checks that ours and the builtin give identical outputs and
gradients on the benchmark data (power-of-two scales, where both round the same way).

Last, the cost of a ``FakeQuantize`` node in FLOAT state (what a prepared model pays with fake quant
off) is compared with calling nothing and with ``nn.Identity``, per call.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qat_lightning.quant.dtypes import QuantDtype, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, FakeQuantState, set_fake_quantize
from qat_lightning.quant.nodes.functional import fake_quantize, kernels_available


class _CopyFloor(torch.autograd.Function):
    """One copy forward, one copy backward: the memory traffic floor of an out-of-place op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


def builtin_fake_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: QuantDtype, ch_axis: int | None):
    if ch_axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, dtype.qmin, dtype.qmax)
    zero_point = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, ch_axis, dtype.qmin, dtype.qmax)


def make_scale(x: torch.Tensor, dtype: QuantDtype, ch_axis: int | None) -> torch.Tensor:
    """Power-of-two scales covering just under +-8 (x is ~3 * randn): about 0.8 % of the values clip."""
    base = 2.0 ** -math.ceil(math.log2(dtype.qmax / 8.0))
    if ch_axis is None:
        return torch.tensor(base)
    channels = x.shape[ch_axis]
    return base * 2.0 ** (torch.arange(channels) % 3 - 1).float()


CLOCK: Callable[[], float] = time.perf_counter


def timed(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], runs: int, warmup: int
) -> dict[str, float]:
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def check_identical(x, upstream, scale, dtype, ch_axis) -> None:
    leaf = x.detach().requires_grad_(True)
    ours = fake_quantize(leaf, scale, dtype, ch_axis)
    (g_ours,) = torch.autograd.grad(ours, leaf, upstream)
    ref = builtin_fake_quantize(leaf, scale, dtype, ch_axis)
    (g_ref,) = torch.autograd.grad(ref, leaf, upstream)
    if not (torch.equal(ours, ref) and torch.equal(g_ours, g_ref)):
        raise SystemExit(f"ours and torch's fake quant differ ({dtype}, ch_axis={ch_axis}): not benchmarking")


def bench_case(x, upstream, dtype, ch_axis, runs, warmup) -> dict[str, dict[str, float]]:
    scale = make_scale(x, dtype, ch_axis)
    check_identical(x, upstream, scale, dtype, ch_axis)
    leaf = x.detach().requires_grad_(True)
    plain = x.detach()

    def grad_of(op):
        return lambda: torch.autograd.grad(op(leaf), leaf, upstream)

    fwd_bwd = interleaved_medians(
        {
            "ours": grad_of(lambda t: fake_quantize(t, scale, dtype, ch_axis)),
            "builtin": grad_of(lambda t: builtin_fake_quantize(t, scale, dtype, ch_axis)),
            "clone": grad_of(_CopyFloor.apply),
        },
        runs,
        warmup,
    )
    fwd = interleaved_medians(
        {
            "ours": lambda: fake_quantize(plain, scale, dtype, ch_axis),
            "builtin": lambda: builtin_fake_quantize(plain, scale, dtype, ch_axis),
            "clone": plain.clone,
        },
        runs,
        warmup,
    )
    return {"fwd+bwd": fwd_bwd, "fwd": fwd}


def bench_float_node(x: torch.Tensor, calls: int, runs: int) -> dict[str, float]:
    """Seconds per call: FLOAT-state FakeQuantize, nn.Identity, and nothing (the bare loop)."""
    node = FakeQuantize(qint8, "minmax")
    set_fake_quantize(node, FakeQuantState.FLOAT)
    identity = nn.Identity()

    def loop_node() -> None:
        for _ in range(calls):
            node(x)

    def loop_identity() -> None:
        for _ in range(calls):
            identity(x)

    def loop_nothing() -> None:
        for _ in range(calls):
            pass

    medians = interleaved_medians(
        {"float_node": loop_node, "identity": loop_identity, "nothing": loop_nothing}, runs, 1
    )
    return {name: seconds / calls for name, seconds in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=11, help="timed runs per contender (median), >= 7")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ms", action="store_true", help="also print absolute medians in ms")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time, this process's CPU time over all "
        "its threads (less sensitive to other processes on a shared machine, but counts spin-waits)",
    )
    args = parser.parse_args()
    if args.runs < 7:
        parser.error("--runs must be >= 7")
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time

    torch.manual_seed(0)
    x = torch.randn(*args.shape) * 3
    upstream = torch.randn(*args.shape)
    size_mb = x.numel() * x.element_size() / 1e6
    print(
        f"fake quant benchmark: {'x'.join(map(str, args.shape))} float32 ({size_mb:.1f} MB), "
        f"median of {args.runs} interleaved runs after {args.warmup} warm-up"
    )
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} CPUs, clock: {args.clock}, load average at start: {os.getloadavg()[0]:.2f}"
    )
    print(f"fused C kernels: {'yes' if kernels_available() else 'no (ATen formulas)'}")
    print()
    header = f"{'threads':>7}  {'dtype':<6}  {'granularity':<14}  {'pass':<7}  "
    header += f"{'ours/clone':>10}  {'builtin/clone':>13}  {'builtin/ours':>12}"
    if args.ms:
        header += f"  {'ours ms':>8}  {'builtin ms':>10}  {'clone ms':>8}"
    print(header)
    print("-" * len(header))
    speedups: dict[str, list[float]] = {"fwd+bwd": [], "fwd": []}
    cases = [(dtype, axis) for dtype in (qint8, qint16) for axis in (None, 1)]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype, ch_axis in cases:
            result = bench_case(x, upstream, dtype, ch_axis, args.runs, args.warmup)
            granularity = "per-tensor" if ch_axis is None else f"per-channel:{ch_axis}"
            for pass_name, m in result.items():
                speedups[pass_name].append(m["builtin"] / m["ours"])
                line = f"{threads:>7}  {dtype.name:<6}  {granularity:<14}  {pass_name:<7}  "
                line += f"{m['ours'] / m['clone']:>10.2f}  {m['builtin'] / m['clone']:>13.2f}  "
                line += f"{m['builtin'] / m['ours']:>12.2f}"
                if args.ms:
                    line += (
                        f"  {m['ours'] * 1e3:>8.2f}  {m['builtin'] * 1e3:>10.2f}  {m['clone'] * 1e3:>8.2f}"
                    )
                print(line)
    print()
    for pass_name, values in speedups.items():
        geo = math.exp(sum(map(math.log, values)) / len(values))
        spread = f"min {min(values):.2f}, geometric mean {geo:.2f}, max {max(values):.2f}"
        print(f"builtin/ours {pass_name}: {spread}")

    torch.set_num_threads(args.threads[0])
    per_call = bench_float_node(x, calls=2000, runs=args.runs)
    clone_s = statistics.median(timed(x.clone) for _ in range(args.runs))
    over_nothing = per_call["float_node"] - per_call["nothing"]
    load = os.getloadavg()[0]
    print()
    print(
        f"FakeQuantize in FLOAT state: {per_call['float_node'] * 1e6:.2f} us per call "
        f"(nn.Identity {per_call['identity'] * 1e6:.2f} us, empty loop {per_call['nothing'] * 1e6:.2f} us); "
        f"float_node/identity {per_call['float_node'] / per_call['identity']:.2f}, "
        f"(float_node - nothing)/clone {over_nothing / clone_s:.5f}"
    )
    print(f"load average at end: {load:.2f}")


if __name__ == "__main__":
    main()
