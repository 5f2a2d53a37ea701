"""Observer benchmark: update / compute_scale cost and int8 SQNR against torch.ao.

Run: ``python benchmarks/observers.py`` (one process; CPU; a few minutes at most).

Times are medians over ``RUNS`` runs (each run averages ``REPS`` calls), printed as ratios to the
torch.ao ``MinMaxObserver`` update on the same tensor in the same run (so numbers from different machines
are comparable). ``kernel/ATen``: median over runs of the ratio of ``compute_scale`` with the fused
search kernels (``_search_kernels.c``) to the same call on the ATen code (``search_kernels.disabled()``),
timed back to back in each run (printed when the kernels are built). SQNR = 10 log10(E[x^2] /
E[(x - fq(x))^2]) on a held-out batch after calibrating on ``CALIB_BATCHES`` batches, and on the
calibration data itself after one small batch of 4096 values (where entropy calibration used to clip
heavy tails far too much); torch.ao ``HistogramObserver`` runs with ``qscheme=per_tensor_symmetric`` and
``quant_min``/``quant_max`` of the dtype (int16: ``torch.qint32`` with [-32768, 32767]), and its scale is
applied with the same range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.ao.quantization import HistogramObserver
from torch.ao.quantization import MinMaxObserver as AoMinMax

from qat_lightning.quant.backends import search_kernels
from qat_lightning.quant.dtypes import QuantDtype, qint8, qint16
from qat_lightning.quant.observers import make_observer

METHODS = ("minmax", "moving_minmax", "percentile", "kl", "mse", "mix")
SHAPES = ((32, 64, 32, 32), (32, 256, 16, 16))
RUNS, REPS = 11, 5
CALIB_BATCHES = 8
CALIB_SHAPE = (16, 64, 32, 32)


CLOCK: Callable[[], float] = time.perf_counter


def _call_ms(fn: Callable[[], object], reps: int) -> float:
    start = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - start) / reps * 1e3


def median_ms(fn: Callable[[], object], runs: int = RUNS, reps: int = REPS) -> float:
    fn()  # warm up
    return statistics.median(_call_ms(fn, reps) for _ in range(runs))


def median_ratio(
    fn: Callable[[], object], base: Callable[[], object], runs: int = RUNS, reps: int = REPS
) -> float:
    """Median over runs of time(fn) / time(base), the two timed back to back in each run (robust to load)."""
    fn()
    base()
    return statistics.median(_call_ms(fn, reps) / _call_ms(base, reps) for _ in range(runs))


def timing_table(threads: int) -> list[str]:
    torch.set_num_threads(threads)
    lines = []
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen)
        ao = AoMinMax(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)

        def base(ao: AoMinMax = ao, x: torch.Tensor = x) -> None:
            ao(x)

        base_ms = median_ms(base)
        hist = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        hist_ratio = median_ratio(lambda hist=hist, x=x: hist(x), base, runs=5, reps=1)
        lines.append(
            f"threads={threads} shape={shape}: torch.ao MinMaxObserver update = {base_ms:.3f} ms (= 1.00); "
            f"torch.ao HistogramObserver update = {hist_ratio:.2f}x"
        )
        fused = search_kernels.search_kernels_available()
        lines.append(
            f"  {'method':<14}{'update':>9}{'update_range':>14}{'scale int8 ms':>15}{'int16 ms':>10}"
            + (f"{'int8 kernel/ATen':>18}{'int16 kernel/ATen':>19}" if fused else "")
        )
        for method in METHODS:
            obs = make_observer(method)
            upd = median_ratio(lambda obs=obs, x=x: obs(x), base)
            rng = median_ratio(lambda obs=obs, x=x: obs.update_range(x), base)
            s8 = median_ms(lambda obs=obs: obs.compute_scale(qint8))
            s16 = median_ms(lambda obs=obs: obs.compute_scale(qint16))
            row = f"  {method:<14}{upd:>8.2f}x{rng:>13.2f}x{s8:>15.3f}{s16:>10.3f}"
            if fused and obs.histogram is not None:
                row += f"{kernel_ratio(obs, qint8):>18.2f}{kernel_ratio(obs, qint16):>19.2f}"
            lines.append(row)
    return lines


def sample(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "student_t3":
        # Student-t(3) = N / sqrt(chi2_3 / 3)
        n = torch.randn(shape, generator=gen)
        chi2 = torch.randn((3, *shape), generator=gen).pow(2).sum(0)
        return n / (chi2 / 3).sqrt()
    if kind == "laplace":
        exp = torch.empty((2, *shape)).exponential_(generator=gen)
        return exp[0] - exp[1]
    if kind == "relu_gauss":
        return torch.relu(torch.randn(shape, generator=gen))
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "uniform":
        return torch.rand(shape, generator=gen) * 2 - 1
    raise ValueError(kind)


def sqnr(x: torch.Tensor, scale: float, qmin: int, qmax: int) -> float:
    q = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    return float(10 * torch.log10(x.pow(2).mean() / (x - q).pow(2).mean()))


SQNR_KINDS = ("student_t3", "normal", "uniform", "laplace", "relu_gauss")
SQNR_CASES = (
    ("held-out batch, 8 calibration batches", CALIB_SHAPE, CALIB_BATCHES, True),
    ("calibration data, one batch of 4096", (4096,), 1, False),
)


def _ao_scale(batches: list[torch.Tensor], dtype: QuantDtype) -> float:
    ao = HistogramObserver(
        dtype=torch.qint8 if dtype is qint8 else torch.qint32,
        qscheme=torch.per_tensor_symmetric,
        quant_min=-dtype.qmax - 1,
        quant_max=dtype.qmax,
    )
    for batch in batches:
        ao(batch)
    return float(ao.calculate_qparams()[0])


def sqnr_table() -> list[str]:
    torch.set_num_threads(2)
    names = [m.replace("moving_minmax", "moving") for m in METHODS]
    lines = []
    for title, shape, batches, held_out in SQNR_CASES:
        for dtype in (qint8, qint16):
            lo, hi = -dtype.qmax - 1, dtype.qmax
            lines.append(f"{dtype.name} SQNR (dB), {title}:")
            lines.append(
                f"  {'data':<12}"
                + "".join(f"{m:>11}" for m in (*names, "ao_hist"))
                + f"{'kl-ao':>8}{'mix pick':>10}"
            )
            for kind in SQNR_KINDS:
                gen = torch.Generator().manual_seed(1)
                calib = [sample(kind, shape, gen) for _ in range(batches)]
                held = sample(kind, shape, gen) if held_out else torch.cat([c.reshape(-1) for c in calib])
                observers = {m: make_observer(m) for m in METHODS}
                for batch in calib:
                    for obs in observers.values():
                        obs(batch)
                row = [sqnr(held, float(o.compute_scale(dtype)), lo, hi) for o in observers.values()]
                row.append(sqnr(held, _ao_scale(calib, dtype), lo, hi))
                pick = observers["mix"].last_choice
                gap = row[METHODS.index("kl")] - row[-1]
                lines.append(
                    f"  {kind:<12}" + "".join(f"{v:>11.2f}" for v in row) + f"{gap:>+8.2f}{pick:>10}"
                )
    return lines


def kernel_ratio(obs: torch.nn.Module, dtype: QuantDtype) -> float:
    """Median ratio of ``obs.compute_scale(dtype)`` with the search kernels to the ATen code, back to back."""

    def aten() -> None:
        with search_kernels.disabled():
            obs.compute_scale(dtype)

    return median_ratio(lambda: obs.compute_scale(dtype), aten)


def _search_kernel_state() -> str:
    if search_kernels.search_kernels_available():
        return "in use (qat_lightning.quant.backends._search_kernels)"
    if os.environ.get("QAT_LIGHTNING_NO_KERNELS", "") not in ("", "0"):
        return "off (QAT_LIGHTNING_NO_KERNELS)"
    return "not built (ATen code)"


def per_channel_table(threads: int) -> list[str]:
    """Per-channel weight: update and compute_scale times; kernel / ATen search ratios timed back to back."""
    torch.set_num_threads(threads)
    w = torch.randn(256, 256, 3, 3, generator=torch.Generator().manual_seed(2))
    fused = search_kernels.search_kernels_available()
    lines = [
        f"per-channel weight (256, 256, 3, 3), ch_axis=0, {threads} thread(s); search kernels: "
        f"{_search_kernel_state()}",
        f"  {'method':<14}{'update ms':>10}{'int8 ms':>10}{'int16 ms':>10}"
        + (f"{'int8 kernel/ATen':>18}{'int16 kernel/ATen':>19}" if fused else ""),
    ]
    for method in METHODS:
        obs = make_observer(method, ch_axis=0, num_channels=256)
        upd = median_ms(lambda obs=obs: obs(w))
        row = f"  {method:<14}{upd:>10.3f}"
        ratios = ""
        for dtype in (qint8, qint16):
            row += f"{median_ms(lambda obs=obs, dtype=dtype: obs.compute_scale(dtype)):>10.3f}"
            if fused:
                width = 18 if dtype is qint8 else 19
                ratio = kernel_ratio(obs, dtype) if obs.histogram is not None else None
                ratios += "-".rjust(width) if ratio is None else f"{ratio:>{width}.2f}"
        lines.append(row + ratios)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-sqnr", action="store_true")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with time.thread_time (this thread's CPU time: stable on a loaded machine; 1 thread)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
        args.threads = [1]
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(
        f"torch {torch.__version__}; {clock}; "
        "update and update_range as ratios to torch.ao MinMaxObserver update; "
        f"search kernels: {_search_kernel_state()}"
    )
    for threads in args.threads:
        print("\n".join(timing_table(threads)))
    for threads in args.threads:
        print("\n".join(per_channel_table(threads)))
    if not args.skip_sqnr:
        print("\n".join(sqnr_table()))


if __name__ == "__main__":
    main()
