"""ONNX QDQ export: onnxruntime vs fake quant, file size vs the float ONNX, export + check time.

``python benchmarks/export.py [--repeats 3]``

Models (random weights, calibrated on the data below, all int8 unless named): the built-in example
(``DigitsNet`` on load_digits, the float model trained 2 epochs here first), a CNN (``TinyResNet`` width 64,
residual adds, conv+bn+relu fused), a torch ``nn.TransformerEncoder`` (d=128, 2 distinct layers), a HF BERT
(hidden 128, 2 layers, from ``BertConfig``) and the CNN in int16. One process; times are medians of
``--repeats`` runs, also given as a ratio to the float model's own ONNX export (torch.onnx, same process).
"worst cosine", "SQNR", "top-1": ``check_export`` at onnxruntime's deployed level (``optimization="all"``,
what it judges); "cosine, ORT opt. off" is its unoptimized session (fake quant's own float32 arithmetic).
"per point" is ``QuantAnalysis(..., reference="onnxruntime").compare_per_layer()`` on the check batches (the
optimized graph): the largest error of any quant point in quantization steps (at which op) and how many
points exceed ``first_export_mismatch``'s tolerance (1 step + the point's float32 noise floor); then the
same with onnxruntime's optimizations off.

``--pipeline-seeds 0 1 2`` also runs the Hydra app's whole pipeline on the built-in example once per seed
(``qat-lightning stage=pipeline seed=<s>``, a subprocess each) and reports the medians (and worst) of its
last step's onnxruntime check of the pipeline-chosen model (``*_export/export_check.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qat_lightning as ql  # noqa: E402
from qat_lightning.analysis import (  # noqa: E402
    QuantAnalysis,
    check_export,
    compare_export_per_layer,
    first_export_mismatch,
)
from qat_lightning.quant.qconfig.templates import ModuleNameTemplate  # noqa: E402
from tests.models import TinyResNet  # noqa: E402


def _digits(train_epochs: int = 2):
    from qat_lightning.example.data import load_digits_tensors
    from qat_lightning.example.model import DigitsNet

    x, y = load_digits_tensors()
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(train_epochs):
        for i in range(0, 1400, 32):
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    calib = [x[i : i + 64] for i in range(0, 640, 64)]
    check = [(x[i : i + 64], y[i : i + 64]) for i in range(1400, 1797, 64)]
    return model, (x[:8],), calib, check


def _cnn():
    xs = [torch.randn(16, 3, 32, 32) for _ in range(8)]
    return TinyResNet(width=64).eval(), (xs[0],), xs[:4], xs[4:]


def _encoder():
    layer = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True)
    xs = [torch.randn(8, 16, 128) for _ in range(8)]
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    for sub in encoder.layers:  # distinct layers, as after training (the clones start equal)
        for mod in sub.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        sub.self_attn._reset_parameters()
    return encoder, (xs[0],), xs[:4], xs[4:]


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, vocab_size=1000
    )
    xs = [{"input_ids": torch.randint(0, 1000, (8, 16))} for _ in range(8)]
    return BertModel(cfg).eval(), xs[0], xs[:4], xs[4:]


def _calibrated(model, example, calib, setter=None):
    prepared = ql.prepare(model, example_inputs=example, qconfig_setter=setter).eval()
    ql.set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        for b in calib:
            prepared(**b) if isinstance(b, dict) else prepared(b)
    ql.set_fake_quantize(prepared, "validation")
    return prepared


class _Kwargs(nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return tuple(self.model(**dict(zip(self.names, args, strict=True))).values())


def _float_onnx(model, example, path):
    if isinstance(example, dict):
        model, example = _Kwargs(model, tuple(example)), tuple(example.values())
    t = time.perf_counter()
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=20)
    return time.perf_counter() - t


def run(name, build, repeats, setter=None):
    torch.manual_seed(0)
    model, example, calib, check_data = build()
    prepared = _calibrated(model, example, calib, setter)
    times, float_times = [], []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            float_times.append(_float_onnx(model, example, Path(d) / "float.onnx"))
            t = time.perf_counter()
            result = ql.export_onnx(prepared, example, Path(d) / "q.onnx")
            check = check_export(prepared, result.path, check_data)
            times.append(time.perf_counter() - t)
        float_size = (Path(d) / "float.onnx").stat().st_size
        qa = QuantAnalysis(prepared, out_dir=Path(d) / "qa", reference="onnxruntime", onnx_path=result.path)
        qa.run(check_data)
        points = qa.compare_per_layer(plot=False).rows
        points_off = compare_export_per_layer(
            prepared, result.path, check_data, num_batches=None, optimization="disabled"
        )
    worst = min(check.outputs, key=lambda o: o.cosine)
    off = min(o.cosine for o in check.unoptimized)
    worst_point = max(points, key=lambda r: r.max_steps)
    top1 = [o.top1_agreement for o in check.outputs if o.top1_agreement is not None]
    med, fmed = statistics.median(times), statistics.median(float_times)
    print(
        f"| {name} | {worst.cosine:.6f} | {worst.sqnr_db:.1f} | "
        f"{'-' if not top1 else f'{100 * min(top1):.2f}%'} | {off:.6f} | {result.num_qdq} | "
        f"{result.size_bytes / float_size:.3f} ({result.size_bytes // 1024} / {float_size // 1024} KiB) | "
        f"{med:.2f} s ({med / fmed:.1f}x float export) | {'PASS' if check.passed else 'FAIL'} | "
        f"{worst_point.max_steps:.2f} ({worst_point.op_name} {worst_point.role}), "
        f"{sum(first_export_mismatch([r]) is not None for r in points)}/{len(points)} beyond tol.; opt. off: "
        f"{max(r.max_steps for r in points_off):.2f}, "
        f"{sum(first_export_mismatch([r]) is not None for r in points_off)}/{len(points_off)} |",
        flush=True,
    )


def pipeline(seeds: list[int]) -> None:
    """Run the app's pipeline on the built-in example per seed; medians of its export check."""
    rows = []
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        for seed in seeds:
            run_dir = Path(d) / f"seed{seed}"
            cmd = [sys.executable, "-c", "from qat_lightning.cli import main; main()"]
            cmd += ["stage=pipeline", f"seed={seed}", f"hydra.run.dir={run_dir}"]
            subprocess.run(cmd, cwd=root, check=True, capture_output=True)
            (check_file,) = run_dir.glob("*_export/export_check.json")
            check = json.loads(check_file.read_text())
            (out,) = check["outputs"]
            summary = (run_dir / "summary.md").read_text().splitlines()
            chosen = next(line for line in summary if "chosen recipe" in line).split("**: ")[-1]
            rows.append((out["cosine"], out["sqnr_db"], out["top1_agreement"], check["passed"], chosen))
            print(f"seed {seed}: chosen {chosen}; {out}", flush=True)
    cos, sqnr, top1 = ([r[i] for r in rows] for i in range(3))
    print(
        f"pipeline-chosen model, built-in example, {len(seeds)} seeds: onnxruntime vs fake quant cosine "
        f"median {statistics.median(cos):.6f} (worst {min(cos):.6f}), "
        f"SQNR median {statistics.median(sqnr):.1f} dB, "
        f"top-1 agreement median {100 * statistics.median(top1):.2f}% (worst {100 * min(top1):.2f}%), "
        f"checks passed {sum(r[3] for r in rows)}/{len(rows)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-seeds", type=int, nargs="*", default=[])
    parser.add_argument("--only-pipeline", action="store_true")
    args = parser.parse_args()
    if args.pipeline_seeds:
        pipeline(args.pipeline_seeds)
    if args.only_pipeline:
        return
    torch.set_num_threads(1)
    print(
        "| model | worst cosine | SQNR dB | top-1 agree | cosine, ORT opt. off | QDQ | size vs float ONNX "
        "| export+check | check | per point |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    run("built-in example (DigitsNet, int8)", _digits, args.repeats)
    run(
        "built-in example (DigitsNet, int8, cat int16)",
        _digits,
        args.repeats,
        [ModuleNameTemplate({"cat": ql.qint16})],
    )
    run("CNN (TinyResNet w64, int8)", _cnn, args.repeats)
    run(
        "CNN (TinyResNet w64, int16)",
        _cnn,
        args.repeats,
        ql.get_qconfig(weight_dtype=ql.qint16, out_dtype=ql.qint16),
    )
    run("nn.TransformerEncoder d128 (int8)", _encoder, args.repeats)
    run("HF BERT h128 (int8)", _bert, args.repeats)


if __name__ == "__main__":
    main()
