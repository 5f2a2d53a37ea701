"""One QAT training step (forward, backward, SGD step): float vs qat_lightning vs torch.ao FX vs modelopt.

Models: a ResNet-18 (batch 32, 3x64x64) and a 4-layer transformer encoder built from Linear / LayerNorm /
GELU / softmax / matmul (d=256, 4 heads, seq 64, batch 32, MLP 1024).

Contenders (same initial weights; int8, except torch.ao's default x86 mapping, whose activations are 7-bit
``[0, 127]``, reduce_range):

* ``float``: the float model;
* ``ours``: ``qat_lightning.prepare`` (fx, conv-bn-relu fused, ``fuse_bn``), 3 calibration batches, QAT state;
  every op output is quantized, as the chips run it;
* ``ours@gemm-inputs`` (only with ``--contenders``): ``ours`` with only the activations that reach a
  Linear / Conv, and the weights, quantized (:func:`keep_gemm_inputs_only`). ModelOpt 0.47's
  ``INT8_DEFAULT_CFG`` quantizes somewhat more: the inputs of its LayerNorm and pooling layers too (encoder:
  23.6 M activation elements per step against 14.7 M here; CNN 7.9 M against 5.3 M), so this contender does
  less work than ModelOpt, not the same;
* ``ours@one-pass`` (only with ``--contenders``, eager): ``ours`` with every per-tensor integer quant node
  replaced by one out-of-place multiply by 1 (:func:`one_pass_nodes`): what any node that writes a new
  tensor costs on the same points, one pass forward and one backward (weights as ``ours``). A floor for the
  activation nodes on the machine at hand (inductor may fold the multiply away under ``--compile``);
* ``ours@eager`` (only with ``--contenders``, for ``--compile``): ``ours`` not compiled, so that a compiled
  and an eager QAT step are timed in the same process (their ratio is the compiled speed-up);
* ``torch.ao``: ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping()``;
* ``modelopt``: ``modelopt.torch.quantization.quantize(model, INT8_DEFAULT_CFG, forward_loop)`` (only when
  ``nvidia-modelopt`` is installed).

Timing: contenders are interleaved step by step in one process, after warm-up; the median of ``--steps``
steps is reported, and its ratio to float: wall time, and process CPU time (``time.process_time``, all
threads; less sensitive to other processes on a shared machine, but it counts OpenMP spin-waits).
The FLOAT / VALIDATION rows are the eval-mode forward (no grad) of our calibrated model in that state
against the float model's, also interleaved (``--compile``: both compiled, the state flips per step), wall
and CPU time. ``ours+kernels`` is not run under ``--compile`` (traced nodes run the formula whatever the
backend).

Peak memory: tracemalloc does not see torch's allocations, so each contender runs in a fresh subprocess:
after the setup (model, prepare, calibration) freed memory is handed back (``malloc_trim``), the kernel's
peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``), 3 steps run, and the peak RSS above the
RSS at the reset is reported (Linux/glibc only): activations, gradients, optimizer state and temporaries
of training. With ``--compile`` the child compiles and runs one step before the reset, so compilation is not
counted (nor is the optimizer state, created in that step). Ratios are to float. ``peak`` runs with glibc's
default allocator (what a user sees; it includes freed memory the heap keeps), ``live`` with
``MALLOC_MMAP_THRESHOLD_=65536`` (large allocations unmapped when freed, so the peak follows the live
tensors).

``--keep-heap`` calls :func:`~qat_lightning.quant.backends.keep_heap` first (timing and ``peak`` processes):
glibc then keeps freed memory mapped instead of re-faulting it every step; all contenders run under it.

Usage: ``python benchmarks/qat_step.py [--model cnn|encoder|all] [--steps 9] [--threads 2] [--no-memory]
[--keep-heap] [--device cuda] [--compile] [--no-layout-opt] [--contenders ours,modelopt]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # a constant: torch.ao would put a fake quant on a traced float
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.heads
        q = self.q(x).view(b, s, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, s, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, s, h, d // h).transpose(1, 2)
        attn = F.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, s, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(EncoderLayer(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(x))


def build(name: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    if name == "cnn":
        return ResNet18(), lambda: torch.randn(32, 3, 64, 64)
    return Encoder(), lambda: torch.randn(32, 64, 256)


# ------------------------------------------------------------------------------------------------- contenders
OPTIONS = {"device": "cpu", "compile": False, "no_layout_opt": False, "only": ""}
"""``--device`` / ``--compile`` / ``--no-layout-opt`` / ``--contenders``: where every contender runs, whether
it runs ``torch.compile``d (and with inductor's layout optimization off), and which contenders run
(comma-separated; empty: all available)."""


def make(name: str, contender: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model, data = _make(name, contender)
    device = OPTIONS["device"]
    model = model.to(device)
    if OPTIONS["compile"] and contender != EAGER:
        model = torch.compile(model)
    return model, lambda: data().to(device)


def _make(name: str, contender: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    from qat_lightning.quant.backends import set_backend

    set_backend("default")
    model, data = build(name)
    model.train()
    calib = [data() for _ in range(3)]
    if contender == "float":
        return model, data
    if contender in ("ours", "ours+kernels", GEMM_INPUTS, ONE_PASS, EAGER):
        from qat_lightning.quant.nodes.fake_quantize import set_fake_quantize
        from qat_lightning.quant.preparation.prepare import prepare

        prepared = prepare(model, calib[0][:4])
        prepared.eval()
        set_fake_quantize(prepared, "calibration")
        with torch.no_grad():
            for batch in calib:
                prepared(batch)
        set_fake_quantize(prepared, "qat")
        if contender == GEMM_INPUTS:
            keep_gemm_inputs_only(prepared)
        if contender == ONE_PASS:
            one_pass_nodes(prepared)
        return prepared.train(), data
    if contender == "torch.ao":
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model, get_default_qat_qconfig_mapping(), (calib[0][:4],)).train(), data
    if contender == "modelopt":
        import modelopt.torch.quantization as mtq

        def loop(m: nn.Module) -> None:
            with torch.no_grad():
                for batch in calib:
                    m(batch)

        model.eval()
        return mtq.quantize(model, mtq.INT8_DEFAULT_CFG, loop).train(), data
    raise ValueError(contender)


GEMM_INPUTS = "ours@gemm-inputs"
ONE_PASS = "ours@one-pass"
EAGER = "ours@eager"
SHAPE_ONLY = {"view", "reshape", "transpose", "permute", "flatten", "contiguous", "squeeze", "unsqueeze", "t"}


def keep_gemm_inputs_only(gm: torch.fx.GraphModule) -> int:
    """Turn off (float32) every output quant node whose value reaches no Linear / Conv; return how many.

    Left quantized: the gemm inputs and the weights (ModelOpt's ``INT8_DEFAULT_CFG`` also quantizes LayerNorm
    and pooling inputs, so it does more). A value reaches a gemm when a gemm op takes it, directly or
    through shape-only calls (``view``, ``transpose``, ``reshape``, ``flatten``, ...).
    """
    from qat_lightning.quant.nodes.qat_modules import QatConvBn, QatGemm

    modules = dict(gm.named_modules())

    def reshapes(user: torch.fx.Node, node: torch.fx.Node) -> bool:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        return user.op in ("call_method", "call_function") and name in SHAPE_ONLY and user.args[:1] == (node,)

    def reaches_gemm(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and isinstance(modules[user.target], (QatGemm, QatConvBn)):
                return True
            if reshapes(user, node) and reaches_gemm(user):
                return True
        return False

    off = 0
    for node in gm.graph.nodes:
        quant = getattr(modules.get(node.target), "output_quant", None) if node.op == "call_module" else None
        if quant is not None and quant.dtype.is_integer and not reaches_gemm(node):
            quant.dtype = "float32"
            off += 1
    return off


def _times_one(x: torch.Tensor) -> torch.Tensor:
    return x * 1.0


def one_pass_nodes(model: nn.Module) -> int:
    """Make every per-tensor integer quant node of ``model`` return ``x * 1.0``; return how many.

    One out-of-place pass forward (read ``x``, write a new tensor) and one backward (``MulBackward0``: the
    same for the gradient), nothing observed: the least a quant node that writes its result to a new tensor
    costs at those points. Weight (per-channel) nodes keep their fake quant.
    """
    from qat_lightning.quant.nodes.fake_quantize import iter_fake_quantize

    nodes = [n for _, n in iter_fake_quantize(model) if n.ch_axis is None and n.dtype.is_integer]
    for node in nodes:
        node.forward = _times_one  # an instance attribute: nn.Module.__call__ runs it
    return len(nodes)


def contenders() -> list[str]:
    from qat_lightning.quant.backends.cpu_kernels import kernels_available

    names = ["float", "ours", "torch.ao"]
    if kernels_available() and OPTIONS["device"] == "cpu" and not OPTIONS["compile"]:
        names.insert(2, "ours+kernels")  # the opt-in cpu_kernels backend (process-wide: set per step)
        # (not under --compile: traced nodes run the formula whatever the backend, so it would be ``ours``)
    try:
        import modelopt.torch.quantization  # noqa: F401

        names.append("modelopt")
    except Exception:  # noqa: BLE001
        pass
    only = [c for c in OPTIONS["only"].split(",") if c]
    for extra in (EAGER, ONE_PASS, GEMM_INPUTS):  # variants of ours: only on request
        if extra in only:
            names.insert(names.index("ours") + 1, extra)
    return [c for c in names if c == "float" or not only or c in only]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, contender: str = "") -> None:
    from qat_lightning.quant.backends import set_backend

    set_backend("cpu_kernels" if contender == "ours+kernels" else "default")
    out = model(x)
    loss = out.float().square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if OPTIONS["device"].startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- timing
def time_steps(name: str, steps: int, warmup: int = 2) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median process CPU time of one step, per contender (interleaved)."""
    models = {c: make(name, c) for c in contenders()}
    opts = {c: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for c, (m, _) in models.items()}
    batches = {c: data() for c, (_, data) in models.items()}
    wall: dict[str, list[float]] = {c: [] for c in models}
    cpu: dict[str, list[float]] = {c: [] for c in models}
    for c, (model, _) in list(models.items()):  # first step (compiles): a contender that fails is left out
        try:
            train_step(model, opts[c], batches[c], c)
        except Exception as err:  # noqa: BLE001
            print(f"  {c} left out: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            del models[c], wall[c], cpu[c]
    for i in range(warmup + steps):
        for c, (model, _) in models.items():
            t, p = time.perf_counter(), time.process_time()
            train_step(model, opts[c], batches[c], c)
            if i >= warmup:
                wall[c].append(time.perf_counter() - t)
                cpu[c].append(time.process_time() - p)
    return (
        {c: statistics.median(v) for c, v in wall.items()},
        {c: statistics.median(v) for c, v in cpu.items()},
    )


def time_inference(name: str, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median eval forward (no grad) of the float model and of our calibrated model in FLOAT and VALIDATION.

    Interleaved; with ``--compile`` each is ``torch.compile``d (ours: one compiled model whose state flips,
    one graph per state). Ours runs inside ``frozen_parameters``, as in the QAT callback's validation loop and
    the analysis tools: a conv-bn op keeps its eval fold (outside it, it re-folds every forward).
    """
    from qat_lightning.quant.nodes.fake_quantize import set_fake_quantize
    from qat_lightning.quant.nodes.frozen import frozen_parameters

    float_model, data = make(name, "float")
    ours, _ = make(name, "ours")
    float_model.eval()
    ours.eval()
    x = data()
    keys = ("float", "FLOAT state", "VALIDATION state")
    times: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    with torch.no_grad(), frozen_parameters(ours):
        for i in range(warmup + steps):
            for key in keys:
                if key != "float":
                    set_fake_quantize(ours, key.split()[0])
                t, c = time.perf_counter(), time.process_time()
                (float_model if key == "float" else ours)(x)
                if OPTIONS["device"].startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[key].append(time.perf_counter() - t)
                    cpu[key].append(time.process_time() - c)
    return {k: (statistics.median(times[k]), statistics.median(cpu[k])) for k in keys}


# ------------------------------------------------------------------------------------------------- memory
def _status(key: str) -> int:
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024


def memory_child(name: str, contender: str) -> None:
    import ctypes
    import gc

    model, data = make(name, contender)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = data()
    if OPTIONS["compile"]:
        train_step(model, opt, x, contender)  # compiles: that memory is not the step's
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed setup memory back: RSS = live memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    for _ in range(3):
        train_step(model, opt, x, contender)
    print(json.dumps({"peak": _status("VmHWM") - base}))


LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: every allocation of 64 KiB or more is its own mapping, unmapped when freed, so the peak RSS
follows the live tensors instead of what the default (dynamic-threshold) heap keeps after frees."""


def measure_memory(
    name: str, threads: int, env: dict[str, str] | None = None, keep_heap: bool = False
) -> dict[str, int]:
    out, extra = {}, ["--keep-heap"] if keep_heap else []
    if OPTIONS["compile"]:  # the child measures what the parent times
        extra += ["--compile", *(["--no-layout-opt"] if OPTIONS["no_layout_opt"] else [])]
    for c in contenders():
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, c, "--threads", str(threads), *extra],
            capture_output=True,
            text=True,
            check=True,
            env=None if env is None else {**os.environ, **env},
        )
        out[c] = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    return out


def _memory_text(mem: dict[str, int], c: str) -> str:
    m = mem.get(c)
    return f"{m / 2**20:8.0f} {m / mem['float']:8.2f}" if m is not None else f"{'-':>8} {'-':>8}"


def machine_text() -> str:
    """CPU model, torch's CPU kernel ISA and the per-core data cache sizes (Linux), for the run's header."""
    from pathlib import Path

    model, caches = "unknown CPU", "caches unknown"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), model)
        root = Path("/sys/devices/system/cpu/cpu0/cache")
        levels = [p for p in sorted(root.glob("index*")) if (p / "type").read_text().strip() != "Instruction"]
        caches = ", ".join(
            f"L{(p / 'level').read_text().strip()} {(p / 'size').read_text().strip()}" for p in levels
        )
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}; {caches}), {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "encoder", "all"], default="all")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CONTENDER"))
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="call quant.backends.keep_heap() first (glibc keeps freed memory mapped; every contender alike)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (every contender)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every contender (inductor)")
    parser.add_argument(
        "--no-layout-opt",
        action="store_true",
        help="with --compile: torch._inductor.config.layout_optimization = False for every contender",
    )
    parser.add_argument("--contenders", default="", help="comma-separated subset (float always runs)")
    args = parser.parse_args()
    OPTIONS.update(
        device=args.device, compile=args.compile, no_layout_opt=args.no_layout_opt, only=args.contenders
    )
    if args.no_layout_opt:  # inductor's channels-last conv layout: slower on this CPU, float model included
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    torch.set_num_threads(args.threads)
    if args.keep_heap:
        import qat_lightning

        qat_lightning.quant.backends.keep_heap()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    names = ["cnn", "encoder"] if args.model == "all" else [args.model]
    from qat_lightning.quant.backends.cpu_kernels import kernels_available

    kernels = "ours+kernels = cpu_kernels backend" if kernels_available() else "no C kernels built"
    heap = "keep_heap()" if args.keep_heap else "default glibc heap"
    print(
        f"torch {torch.__version__}, {args.device}{', compiled' if args.compile else ''}"
        f"{', no layout optimization' if args.no_layout_opt else ''}, {args.threads} "
        f"threads, median of {args.steps} steps, {kernels}, {heap}"
    )
    print(machine_text())
    for name in names:
        times, cpu = time_steps(name, args.steps)
        inference = time_inference(name, args.steps)
        no_memory = args.no_memory or args.device != "cpu"
        mem = {} if no_memory else measure_memory(name, args.threads, keep_heap=args.keep_heap)
        live = {} if no_memory else measure_memory(name, args.threads, LIVE_ENV)
        print(f"\n{name}: train step (forward + backward + SGD)")
        print(
            f"  {'contender':<16} {'wall ms':>9} {'x float':>8} {'cpu ms':>8} {'x float':>8} "
            f"{'peak MB':>8} {'x float':>8} {'live MB':>8} {'x float':>8}"
        )
        for c, t in times.items():
            print(
                f"  {c:<16} {t * 1e3:9.1f} {t / times['float']:8.2f} {cpu[c] * 1e3:8.1f} "
                f"{cpu[c] / cpu['float']:8.2f} {_memory_text(mem, c)} {_memory_text(live, c)}"
            )
        (fw, fc) = inference["float"]
        for key in ("FLOAT state", "VALIDATION state"):
            w, c = inference[key]
            print(
                f"  {key} forward (eval, no grad): wall {w * 1e3:.1f} ms vs float {fw * 1e3:.1f} ms = "
                f"{w / fw:.3f}x; cpu {c * 1e3:.1f} ms vs float {fc * 1e3:.1f} ms = {c / fc:.3f}x"
            )


if __name__ == "__main__":
    main()
