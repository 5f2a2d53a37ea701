"""Sensitivity sweep benchmark: downstream-slice exact sweep vs the naive sweep, and the approximate method.

Model: a ResNet-18 (torchvision layout, 7x7 stem, 3x64x64 input, 100 classes), prepared with
``prepare(method="fx")`` (all int8, mse observers), calibrated on 4 random batches; analysed on one batch
of 8. One process, same inputs, interleaved repeats, medians:

* ``exact``: ``exact_sensitivity(use_slice=True)``: the float run is cached once; each row re-runs only
  the nodes downstream of its op;
* ``naive``: ``exact_sensitivity(use_slice=False)``: one full forward of the prepared model per row (per
  enabled quant-node set), the way torch.ao toggling or AIMET's per-layer analysis work;
* ``approx-k``: ``approximate_sensitivity(num_probes=k)`` (one forward + ``k`` backward passes).

Asserted: exact and naive give identical values (hence the same ranking). Reported: times, ratios, and
the Spearman correlation of the approximate ranking with the exact one.

    python benchmarks/sensitivity.py [--repeats 3] [--batch 8] [--threads N] [--probes 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from qat_lightning.analysis.compare.metrics import resolve_metric
from qat_lightning.analysis.sensitivity.approximate import approximate_sensitivity
from qat_lightning.quant.preparation.prepare import prepare
from scipy.stats import spearmanr
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis.sensitivity import build_tables, exact_sensitivity, sensitivity_targets


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
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(batch: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = ResNet18().eval()
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model, (torch.randn(batch, 3, 64, 64, generator=gen),), method="fx")
    ql.set_fake_quantize(prepared, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(batch, 3, 64, 64, generator=gen))
    ql.set_fake_quantize(prepared, ql.FakeQuantState.VALIDATION)
    return prepared, (torch.randn(batch, 3, 64, 64, generator=gen),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prepared, inputs = build(args.batch)
    metric = resolve_metric("L1")
    targets = sensitivity_targets(prepared)
    nodes = {id(n) for t in targets for n in t.nodes}
    print(
        f"ResNet-18, batch {args.batch}, 3x64x64, {torch.get_num_threads()} threads: "
        f"{len(prepared.quant_op_order)} ops, {len(targets)} sensitivity rows, {len(nodes)} quant nodes"
    )

    def run_exact() -> dict:
        return exact_sensitivity(prepared, inputs, metric, targets, use_slice=True)

    def run_naive() -> dict:
        return exact_sensitivity(prepared, inputs, metric, targets, use_slice=False)

    def run_approx(probes: int) -> dict:
        return approximate_sensitivity(prepared, inputs, metric, targets, num_probes=probes)

    runs = {"exact": run_exact, "naive": run_naive}
    for k in args.probes:
        runs[f"approx-{k}"] = lambda k=k: run_approx(k)
    results = {name: fn() for name, fn in runs.items()}  # warm-up (scales, allocator)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    assert results["exact"] == results["naive"], "downstream slice and naive sweep disagree"
    exact_table = build_tables(results["exact"], metric, "exact")[0]
    naive_table = build_tables(results["naive"], metric, "exact")[0]
    order = [(r.op_name, r.sensitive_type) for r in exact_table.rows]
    assert order == [(r.op_name, r.sensitive_type) for r in naive_table.rows], "rankings differ"
    med = {name: statistics.median(v) for name, v in times.items()}
    low = {name: min(v) for name, v in times.items()}
    print(f"{'method':<12}{'median s':>10}{'min s':>8}{'vs naive (median/min/paired)':>31}   runs")
    for name in runs:
        paired = statistics.median(a / b for a, b in zip(times[name], times["naive"], strict=True))
        ratios = f"{med[name] / med['naive']:.3f} / {low[name] / low['naive']:.3f} / {paired:.3f}"
        print(
            f"{name:<12}{med[name]:>10.3f}{low[name]:>8.3f}{ratios:>31}   "
            + " ".join(f"{t:.3f}" for t in times[name])
        )
    print("exact == naive: identical values and ranking (asserted)")
    for k in args.probes:
        approx_table = build_tables(results[f"approx-{k}"], metric, "approximate")[0]
        approx_value = {(r.op_name, r.sensitive_type): r.metric for r in approx_table.rows}
        rho = spearmanr([r.metric for r in exact_table.rows], [approx_value[o] for o in order]).statistic
        top10 = len(set(order[:10]) & {(r.op_name, r.sensitive_type) for r in approx_table.rows[:10]})
        print(f"approximate ({k} probe(s)) vs exact: Spearman {rho:.3f}, top-10 overlap {top10}/10")
    print(f"most sensitive: {order[:3]}")


if __name__ == "__main__":
    main()
