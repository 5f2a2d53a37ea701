"""Mixed-precision search benchmark: ``method="exact"`` (bisection) vs ``method="fast"`` in one process.

Model: a 6-layer transformer encoder (d=384, 6 heads, ff 768, pre-norm; ~90 quant ops), trained briefly
on scikit-learn digits as token sequences (each 8x8 image = 8 tokens of 8 pixels, a learned position
embedding, mean-pooled, 10 classes), prepared with ``prepare`` (all int8), calibrated on 4 training
batches. The sensitivity tables are measured on one batch of 64 validation images (exact and
approximate). ``eval_fn`` = mean cosine similarity of the logits to the float logits over the
validation set (the proxy ``QuantAnalysis`` uses); target: ``1 - cosine`` at ``--keep`` times the
all-int8 model's.

Printed: each table's time, each search's time (median over ``--repeats``; exact and fast, each with
activation reuse off, ``nearest`` and ``base`` (``SearchConfig.reuse_activations`` /
``cache_reference``), alternated on the same model and table), the ratios fast/exact and reuse/off,
probes, the chosen int16 share and metric, whether the exact and fast plans are equal, and the machine
load (``os.getloadavg``). The script stops with an error when a search with reuse gives other probes
or another plan than the same search without.

    python benchmarks/search.py [--repeats 3] [--threads 2] [--keep 0.25] [--steps 150]
                                 [--tables exact approximate]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis, search_mixed_precision
from qat_lightning.example import load_digits_tensors


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(h).view(b, n, self.heads, -1).transpose(1, 2)
        v = self.v(h).view(b, n, self.heads, -1).transpose(1, 2)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5), dim=-1)
        x = x + self.o(torch.matmul(att, v).transpose(1, 2).reshape(b, n, d))
        return x + self.ff2(self.act(self.ff1(self.norm2(x))))


class DigitsEncoder(nn.Module):
    def __init__(self, d: int = 384, layers: int = 6, heads: int = 6, ff: int = 768) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads, ff) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x.view(x.shape[0], 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(1))


def trained(steps: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = load_digits_tensors()
    x = x / 16.0
    perm = torch.randperm(len(x))
    train, val = perm[:1400], perm[1400:]
    model = DigitsEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (64,))]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, x[train], x[val], y[val]


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep", type=float, default=0.25, help="target: 1 - cosine at this share of the all-int8 model's"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=("exact", "approximate"),
        default=["exact", "approximate"],
        help="sensitivity methods whose tables are searched",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"load average before: {os.getloadavg()}; torch {torch.__version__}; {args.threads} threads",
        flush=True,
    )
    start = time.perf_counter()
    model, x_train, x_val, y_val = trained(args.steps)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
    with torch.no_grad():
        float_logits = model(x_val)
    acc = float((float_logits.argmax(1) == y_val).float().mean())
    prepared = ql.prepare(model, x_train[:64])
    ql.set_fake_quantize(prepared, ql.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for i in range(4):
            prepared(x_train[i * 64 : (i + 1) * 64])
    ql.set_fake_quantize(prepared, ql.FakeQuantState.VALIDATION)
    prepared.eval()
    ops = len(list(ql.iter_quant_ops(prepared)))

    def eval_fn(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x_val)
        return float(nn.functional.cosine_similarity(out, float_logits, dim=1).mean())

    with torch.no_grad():
        q_acc = float((prepared(x_val).argmax(1) == y_val).float().mean())
    base = eval_fn(prepared)
    args.target = 1.0 - args.keep * (1.0 - base)
    print(
        f"model: {ops} quant ops; float accuracy {acc:.4f}; all-int8 accuracy {q_acc:.4f}; "
        f"all-int8 cosine {base:.6f}; target cosine {args.target:.6f}",
        flush=True,
    )
    qa = QuantAnalysis(prepared, out_dir=tempfile.mkdtemp(prefix="search_bench_"))
    tables = {}
    for method in args.tables:
        seconds, got = median_time(
            lambda method=method: qa.sensitivity("COSINE", method=method, inputs=x_val[:64], plot=False), 1
        )
        tables[method] = got
        print(f"sensitivity table {method}: {seconds:.2f} s ({len(got[0].rows)} rows)", flush=True)
    on = {"reuse_activations": True}
    variants = {"off": {}, "nearest": on, "base": {**on, "cache_reference": "base"}}
    for name, table in tables.items():
        times: dict[tuple[str, str], list[float]] = {(m, v): [] for m in ("exact", "fast") for v in variants}
        plans = {}
        for _ in range(args.repeats):
            for key in times:
                start = time.perf_counter()
                plans[key] = search_mixed_precision(
                    prepared, table, eval_fn, args.target, method=key[0], **variants[key[1]]
                )
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"search on the {name} table (median of {args.repeats}):")
        for key in times:
            p = plans[key]
            print(
                f"  {key[0]:<6} reuse {key[1]:<8} {med[key]:7.2f} s  probes {len(p.probes):3d}  "
                f"reached {p.reached}  int16 share {len(p.raised) / len(table[0].rows):.3f}  "
                f"metric {p.metric:.6f}"
            )
        for method in ("exact", "fast"):
            off = plans[(method, "off")]
            for v in ("nearest", "base"):
                p = plans[(method, v)]
                if (p.raised, p.probes) != (off.raised, off.probes):
                    raise SystemExit(f"{method} search with reuse {v}: plan or probes differ from reuse off")
                print(f"  {method} reuse {v}/off time ratio {med[(method, v)] / med[(method, 'off')]:.2f}")
                print(f"    {next(n for n in p.notes if n.startswith('activation reuse'))}")
        exact, fast = plans[("exact", "off")], plans[("fast", "off")]
        same = exact.raised == fast.raised and exact.metric == fast.metric
        ratio = med[("fast", "off")] / med[("exact", "off")]
        print(f"  fast/exact time ratio (reuse off) {ratio:.2f}; plans equal: {same}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
