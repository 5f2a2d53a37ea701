"""The int16 share the search needs to reach 99.5 % of float: today's search vs this branch's pipeline order.

``python benchmarks/int16_share.py [--seeds 3] [--threads 1] [--old /tmp/s2_old] [--ratio 0.995]``
``[--models text digits] [--variants natural planted] [--now CHECKOUT] [--search-only]``

``--search-only`` runs only the default (``fast``) and the ``exact`` search on the plain all-int8 model
with ``--now``'s code (no ``--old`` checkout, no ``ptq=``) and prints ops, rows and probes per seed.

``--old`` is a checkout of the round's merge base (``git worktree add /tmp/s2_old 7553fa8``). Per seed and
model, the float model is trained once here and its state dict saved with the data; two subprocesses then
load the same weights:

* **today** (``PYTHONPATH=--old``): all-int8 ``prepare`` + calibration, ``QuantAnalysis`` bad cases +
  default sensitivity (exact, L1, on the bad cases), default ``search_mixed_precision`` on that model;
* **now** (``PYTHONPATH`` = this checkout): the pipeline's order with ``ptq=all``: ``equalize`` (float model)
  -> prepare + calibration -> ``adaround`` -> ``bias_correction``, tried only when plain all-int8 misses the
  target and kept only if it beats it (the pipeline's rules), then the same analysis + default search on
  that model. Also recorded: ``ptq=equalize`` alone, and the default (``fast``) and ``exact`` searches on
  the plain all-int8 model ("now, no ptq": the app's default ``ptq=none``), to tell the search's part
  from the algorithms'.

Target: ``--ratio`` (99.5 %) of the float model's accuracy on the held-out split the search evaluates
(text: 900 validation docstrings; digits: the 597 test images). Models: ``text`` = a 4-layer encoder
(d=64, 4 heads) classifying which installed library a docstring comes from (``docstring_text.py``);
``digits`` = the 4-layer encoder of ``ptq_accuracy.py``. Each runs ``natural`` (as trained) and
``planted`` (the function-preserving LayerNorm outlier channels of ``real_models.add_outlier_channels``).
Share of ops = distinct ops with a raised row / ops in the sensitivity table; share of cost = (plan -
all-int8) / (all-int16 - all-int8) in the chip's prices (j6m).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from real_models import accuracy, add_outlier_channels, build_model, calibrated_int8, digits, train
from torch import nn

HERE = Path(__file__).resolve().parent
VARIANTS = ("natural", "planted")


# ----------------------------------------------------------------------------------------------- worker
def _search(qm: nn.Module, held_out: list, target: float, out_dir: str, **method: str) -> dict[str, Any]:
    """The app's analysis defaults (bad cases on the held-out split, exact L1 sensitivity), default search."""
    from qat_lightning.analysis import QuantAnalysis, search_mixed_precision

    start = accuracy(qm, held_out)
    if start >= target:
        return {
            "start": start,
            "reached": True,
            "metric": start,
            "ops": 0,
            "raised_ops": 0,
            "cost_share": 0.0,
        }
    t0 = time.perf_counter()
    qa = QuantAnalysis(qm, out_dir=out_dir)
    qa.auto_find_bad_case(held_out, input_fn=lambda b: b[0])
    tables = qa.sensitivity(plot=False)
    plan = search_mixed_precision(qm, list(tables), lambda m: accuracy(m, held_out), target, **method)
    ops = {r.op_name for t in tables for r in t.rows}
    span = plan.cost_high - plan.cost_low
    return {
        "start": start,
        "reached": bool(plan.reached),
        "metric": float(plan.metric),
        "ops": len(ops),
        "raised_ops": len({op for op, _ in plan.raised}),
        "raised_rows": len(plan.raised),
        "cost_share": (plan.cost - plan.cost_low) / span if span > 0 else 0.0,
        "probes": len(plan.probes),
        "seconds": time.perf_counter() - t0,
    }


def _ptq_models(model: nn.Module, calib: list) -> dict[str, tuple[nn.Module, float]]:
    """``ptq=equalize`` and ``ptq=all`` (equalize -> calibrate -> AdaRound -> bias correction), timed."""
    from qat_lightning.ptq import AdaRoundConfig, adaround, bias_correction, equalize

    t0 = time.perf_counter()
    eq = copy.deepcopy(model)
    equalize(eq, calib, num_batches=4)
    t_eq = time.perf_counter()
    eq_q = calibrated_int8(eq, calib)
    t1 = time.perf_counter()
    qm = calibrated_int8(eq, calib)
    adaround(qm, calib, num_batches=16, config=AdaRoundConfig(iterations=500))
    bias_correction(qm, calib, num_batches=16)
    return {"eq": (eq_q, t1 - t0), "ptq": (qm, t_eq - t0 + time.perf_counter() - t1)}


def _now(model: nn.Module, calib: list, held_out: list, res: dict[str, Any], tmp: str) -> None:
    """The pipeline's rule: ``ptq=`` only below target, kept only if better, then the search on the kept."""
    for key in ("eq", "ptq"):
        res[f"{key}_kept"], res[key] = False, res["plain"]
    if res["plain"]["start"] >= res["target"]:
        return
    for key, (qm, seconds) in _ptq_models(model, calib).items():
        acc = accuracy(qm, held_out)
        res[f"{key}_acc"], res[f"{key}_seconds"] = acc, seconds
        res[f"{key}_kept"] = acc > res["plain"]["start"]
        if res[f"{key}_kept"]:
            res[key] = _search(qm, held_out, res["target"], f"{tmp}/{key}")


def worker(data_path: str, pipeline: str, out_path: str) -> None:
    """Run one pipeline on the saved model and data; write its results as JSON."""
    saved = torch.load(data_path, weights_only=False)
    model = build_model(saved["meta"])
    model.load_state_dict(saved["state"])
    model.eval()
    calib, held_out = saved["calib"], saved["held_out"]
    float_acc = accuracy(model, held_out)
    target = saved["ratio"] * float_acc
    plain = calibrated_int8(model, calib)
    res: dict[str, Any] = {"float": float_acc, "target": target}
    with tempfile.TemporaryDirectory() as tmp:
        res["plain"] = _search(plain, held_out, target, tmp + "/plain")
        if pipeline == "search":
            res["plain_exact"] = _search(plain, held_out, target, tmp + "/exact", method="exact")
        if pipeline == "now":
            res["plain_exact"] = _search(plain, held_out, target, tmp + "/exact", method="exact")
            _now(model, calib, held_out, res, tmp)
    Path(out_path).write_text(json.dumps(res), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- main
def _text_model(seed: int) -> tuple[nn.Module, dict, list, list]:
    from docstring_text import docstring_classes

    data = docstring_classes(seed)
    meta = {"kind": "text", "vocab": len(data.vocab), "classes": len(data.labels), "seq_len": 24}
    torch.manual_seed(seed)
    model = train(build_model(meta), data.train, epochs=6, lr=1e-3, seed=seed)
    return model, meta, data.train[:16], data.val


def _digits_model(seed: int) -> tuple[nn.Module, dict, list, list]:
    train_batches, test = digits(seed)
    meta = {"kind": "digits"}
    torch.manual_seed(seed)
    model = train(build_model(meta), train_batches, epochs=30, lr=2e-3, seed=seed)
    return model, meta, train_batches[:16], test


def _run(pipeline: str, data_path: Path, roots: tuple[Path, Path], threads: int) -> dict[str, Any]:
    out = data_path.with_suffix(f".{pipeline}.json")
    root = roots[0] if pipeline == "today" else roots[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{HERE}", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", pipeline, str(data_path), str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=data_path.parent)
    return json.loads(out.read_text(encoding="utf-8"))


def _rows(today: dict, now: dict) -> dict[str, dict[str, Any]]:
    return {
        "today": today["plain"],
        "now, no ptq": now["plain"],
        "now, no ptq, exact search": now["plain_exact"],
        "now, ptq=equalize": now["eq"],
        "now (ptq=all)": now["ptq"],
    }


def _print_table(name: str, runs: list[tuple[dict, dict]]) -> None:
    print(
        f"\n{name}: target {runs[0][0]['target'] / runs[0][0]['float']:.3f} x float, "
        f"medians of {len(runs)} seeds [per seed]"
    )
    print("| pipeline | float % | start % | plan % | reached | ops share | cost share | probes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in ("today", "now, no ptq", "now, no ptq, exact search", "now, ptq=equalize", "now (ptq=all)"):
        got = [_rows(t, n)[row] for t, n in runs]
        fl = [t["float"] for t, _ in runs]
        share = [g["raised_ops"] / g["ops"] if g["ops"] else 0.0 for g in got]
        cost = [g["cost_share"] for g in got]

        def cell(v: list[float], fmt: str = "{:.2f}") -> str:
            return fmt.format(statistics.median(v)) + " [" + ", ".join(fmt.format(x) for x in v) + "]"

        print(
            f"| {row} | {statistics.median(fl):.2f} | {cell([g['start'] for g in got])} | "
            f"{cell([g['metric'] for g in got])} | {sum(g['reached'] for g in got)}/{len(got)} | "
            f"{cell(share, '{:.3f}')} | {cell(cost, '{:.3f}')} | "
            f"{cell([g.get('probes', 0) for g in got], '{:.0f}')} |"
        )


def _print_search_table(runs: dict[str, list[dict]]) -> None:
    """``--search-only``: the default (fast) and the exact search on plain all-int8, per seed."""
    head = "plan %, ops, rows, probes"
    print(f"| model / variant | seed | start % | fast: {head} | exact: {head} |")
    print("|---|---|---|---|---|")
    for name, results in runs.items():
        for seed, res in enumerate(results):
            cells = [
                f"{g['metric']:.2f}, {g['raised_ops']}, {g.get('raised_rows', 0)}, {g.get('probes', 0)}"
                for g in (res["plain"], res["plain_exact"])
            ]
            print(f"| {name} | {seed} | {res['plain']['start']:.2f} | {cells[0]} | {cells[1]} |")


def _save(path: Path, model: nn.Module, meta: dict, calib: list, held_out: list, ratio: float) -> None:
    saved = {"meta": meta, "state": model.state_dict(), "calib": calib, "held_out": held_out, "ratio": ratio}
    torch.save(saved, path)


def main() -> None:
    """Train, save, run both pipelines per seed, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old", type=Path, default=Path("/tmp/s2_old"))
    parser.add_argument("--now", type=Path, default=HERE.parent, help="checkout for 'now' (default: this)")
    parser.add_argument("--models", nargs="+", default=["text", "digits"], choices=["text", "digits"])
    parser.add_argument("--ratio", type=float, default=0.995, help="target = ratio x float accuracy")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--search-only",
        action="store_true",
        help="only the default (fast) and exact searches on plain all-int8 with --now (no today, no ptq)",
    )
    parser.add_argument("--worker", nargs=3, metavar=("PIPELINE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker[1], args.worker[0], args.worker[2])
        return
    if not args.search_only and not (args.old / "qat_lightning").is_dir():
        raise SystemExit(f"--old {args.old} is not a checkout (git worktree add {args.old} 7553fa8)")
    results: dict[str, list[tuple[dict, dict]]] = {}
    searches: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                model, meta, calib, held_out = (_text_model if kind == "text" else _digits_model)(seed)
                for variant in args.variants:
                    m = copy.deepcopy(model)
                    if variant == "planted":
                        add_outlier_channels(m)
                    path = Path(tmp) / f"{kind}_{variant}_{seed}.pt"
                    _save(path, m, meta, calib, held_out, args.ratio)
                    if args.search_only:
                        res = _run("search", path, (args.old, args.now), args.threads)
                        searches.setdefault(f"{kind} / {variant}", []).append(res)
                        print(f"[{kind} {variant} seed {seed}] {res}", flush=True)
                        continue
                    today, now = (
                        _run("today", path, (args.old, args.now), args.threads),
                        _run("now", path, (args.old, args.now), args.threads),
                    )
                    results.setdefault(f"{kind} / {variant}", []).append((today, now))
                    print(f"[{kind} {variant} seed {seed}] today: {today}\n  now: {now}", flush=True)
                print(f"[{kind} seed {seed}] {time.perf_counter() - t0:.0f} s", flush=True)
    for name, runs in results.items():
        _print_table(name, runs)
    if searches:
        _print_search_table(searches)


if __name__ == "__main__":
    main()
