"""Post-training algorithms on models trained on real data (scikit-learn's load_digits): the accuracy table.

``python benchmarks/ptq_accuracy.py [--seeds 3] [--threads 1]``

Two models, each trained briefly on 1200 digits and tested on the other 597 (8x8 images, 10 classes):

* **CNN**: conv-bn-relu x3 (16, 32, 32 channels) + linear head.
* **Transformer encoder**: 4 pre-LN layers, d=32, 2 heads, MLP 64; tokens = the 8 image rows (+ learned
  position embedding). Real encoders have a few LayerNorm output channels with a much larger scale than the
  rest (the "outlier channels" SmoothQuant / LLM.int8 describe); a short training on 8x8 digits does not
  grow them, so after training they are put in *function-preservingly*: in every LayerNorm, channels 0 and 1
  get their gamma and beta multiplied by 40 and the Linear columns reading them divided by 40 (the float
  model computes the same to float32 rounding; its accuracy is measured after the change). Per-tensor int8
  activations then lose measurable accuracy, as in real encoders.

Every model is prepared all-int8 (``ql.prepare``, int8 weights per channel and activations per tensor, mse
observer) and calibrated on 8 batches of 64 training images. Rows: float, int8 (calibration only), and
int8 after ``equalize`` (before prepare) and ``bias_correction`` / ``adaround`` (after calibration), and
torch.ao's fx PTQ (x86 backend, per-channel weights, HistogramObserver) of the same float model. The figures
are medians over ``--seeds`` trainings; "gap recovered" = (method - int8) / (float - int8).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from collections.abc import Callable

import torch
from real_models import Batches, Cnn, Encoder, accuracy, add_outlier_channels, calibrated_int8, digits, train
from torch import nn

from qat_lightning.ptq import AdaRoundConfig, adaround, bias_correction, equalize


@torch.no_grad()
def sqnr_db(model: nn.Module, float_model: nn.Module, batches: Batches) -> float:
    """Output (logit) SQNR against the float model on ``batches``, in dB."""
    ref = torch.cat([float_model(x) for x, _ in batches])
    out = torch.cat([model(x) for x, _ in batches])
    return float(10 * torch.log10(ref.square().sum() / (out - ref).square().sum().clamp_min(1e-30)))


def quantize(
    float_model: nn.Module, calib: Batches, post: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """All-int8 prepare + calibration (+ a post-calibration algorithm)."""
    qm = calibrated_int8(float_model, calib)
    if post is not None:
        post(qm)
    return qm


def torch_ao(float_model: nn.Module, calib: Batches) -> nn.Module:
    """torch.ao fx PTQ (x86: per-channel weights, HistogramObserver activations), converted."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(
            copy.deepcopy(float_model).eval(), get_default_qconfig_mapping("x86"), (calib[0][0],)
        )
        with torch.no_grad():
            for x, _ in calib:
                prepared(x)
        return convert_fx(prepared)


def methods(float_model: nn.Module, calib: Batches) -> dict[str, nn.Module]:
    """Every row's model."""
    ada = AdaRoundConfig(iterations=300)

    def ada_bc(qm: nn.Module) -> None:
        adaround(qm, calib, config=ada)
        bias_correction(qm, calib)

    eq = copy.deepcopy(float_model)
    equalize(eq, calib, num_batches=4)
    return {
        "float": float_model,
        "int8": quantize(float_model, calib),
        "int8 + bias correction": quantize(float_model, calib, lambda m: bias_correction(m, calib)),
        "int8 + adaround": quantize(float_model, calib, lambda m: adaround(m, calib, config=ada)),
        "equalize + int8": quantize(eq, calib),
        "equalize + int8 + bias correction": quantize(eq, calib, lambda m: bias_correction(m, calib)),
        "equalize + int8 + adaround": quantize(eq, calib, lambda m: adaround(m, calib, config=ada)),
        "equalize + int8 + adaround + bias correction": quantize(eq, calib, ada_bc),
        "torch.ao fx PTQ (int8)": torch_ao(float_model, calib),
    }


def build(kind: str, train_batches: Batches, seed: int) -> nn.Module:
    """Train one model of ``kind`` (``cnn`` / ``transformer``)."""
    torch.manual_seed(seed)
    if kind == "cnn":
        return train(Cnn(), train_batches, epochs=8, lr=3e-3, seed=seed)
    model = train(Encoder(), train_batches, epochs=30, lr=2e-3, seed=seed)
    add_outlier_channels(model)
    return model


def main() -> None:
    """Train, quantize, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["cnn", "transformer"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for kind in args.models:
        table: dict[str, list[float]] = {}
        sqnr: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            train_batches, test = digits(seed)
            model = build(kind, train_batches, seed)
            for name, m in methods(model, train_batches[:8]).items():
                table.setdefault(name, []).append(accuracy(m, test))
                if name != "float":
                    sqnr.setdefault(name, []).append(sqnr_db(m, model, test))
            print(
                f"[{kind} seed {seed}] " + ", ".join(f"{k}: {v[-1]:.2f}" for k, v in table.items()),
                flush=True,
            )
        med = {k: statistics.median(v) for k, v in table.items()}
        fl, i8 = med["float"], med["int8"]
        one_sample = 100.0 / sum(len(y) for _, y in digits(0)[1])
        print(f"\n{kind}: test accuracy %, median of {args.seeds} seeds (597 test digits)")
        print("| method | accuracy | vs float | int8 gap recovered | logit SQNR vs float (dB) |")
        print("|---|---|---|---|---|")
        for name, acc in med.items():
            if name == "float":
                gap = ""
            elif fl - i8 < one_sample:
                gap = "n/a (int8 within one test sample of float)"
            else:
                gap = f"{(acc - i8) / (fl - i8):.2f}"
            db = f"{statistics.median(sqnr[name]):.1f}" if name in sqnr else ""
            print(f"| {name} | {acc:.2f} | {acc - fl:+.2f} | {gap} | {db} |")


if __name__ == "__main__":
    main()
