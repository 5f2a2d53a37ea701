"""The pipeline tries ``ptq=`` after all-int8 misses the target, before the int16 search, and says so."""

from __future__ import annotations

from pathlib import Path

from tests.app.helpers import run_app


def test_pipeline_tries_ptq_before_the_int16_search(tmp_path: Path) -> None:
    run_app(
        tmp_path,
        "ptq=equalize_bias_correction",
        "pipeline.sanity=false",
        "target.value=1.01",  # unreachable (accuracy <= 1): every step runs and is reported
    )
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "+ ptq=equalize_bias_correction" in summary  # the step's row
    decision = next(line for line in summary.splitlines() if "ptq=equalize_bias_correction on" in line)
    assert "->" in decision and ("kept" in decision or "dropped" in decision)
    assert summary.index("ptq=equalize_bias_correction on") < summary.index("minimal int16 ratio")
    assert list((tmp_path / "checkpoints").glob("calibration_int8*_ptq.ckpt"))
    assert "| qat |" in summary  # QAT starts from the ptq checkpoint (same state_dict keys)


def test_ptq_calibration_hands_the_float_model_on(tmp_path: Path) -> None:
    """stage=calibration ptq=adaround: the checkpoint carries the float values AdaRound overwrote.

    The float sanity check after calibration measures the float model (not AdaRound's rounded weights), and
    a stage loading the checkpoint (analysis, QAT) gets them back: fake quant off is the float model.
    """
    import torch

    import qat_lightning as ql
    from qat_lightning.app.session import Session
    from qat_lightning.cli import compose, make_factories
    from qat_lightning.ptq import PTQ_CHECKPOINT_KEY, float_reference, original_float_parameters
    from tests.app.helpers import FAST

    run_app(tmp_path / "float", "stage=float", "train.max_epochs=1")
    float_ckpt = tmp_path / "float" / "checkpoints" / "float.ckpt"
    overrides = ["stage=calibration", "recipe=int8", "ptq=adaround", "sanity=float", f"ckpt={float_ckpt}"]
    summary = run_app(tmp_path / "calib", *overrides, "ptq.after_calibration.0.iterations=10")
    decision = next(d for d in summary.decisions if d.startswith("float sanity check after calibration"))
    got, _, want = decision.split("(")[1].rstrip(")").partition(" vs float ")
    assert got == want  # the float function itself, to the last digit shown
    ckpt_path = tmp_path / "calib" / "checkpoints" / "calibration.ckpt"
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    assert any(k.endswith(".weight") for k in ckpt[PTQ_CHECKPOINT_KEY]["model"])
    cfg = compose([*FAST, *overrides])
    session = Session(cfg, tmp_path / "calib", make_factories(cfg))
    lit, _ = session.load_quantized(ckpt_path)
    assert set(original_float_parameters(lit.model)) == set(ckpt[PTQ_CHECKPOINT_KEY]["model"])
    float_lit, _ = session.load_float(float_ckpt)
    x = lit.example_input_array.normal_(generator=torch.Generator().manual_seed(0)).abs() * 8
    net = lit.model.eval()
    with torch.no_grad(), ql.fake_quant_state(net, ql.FakeQuantState.FLOAT):
        plain = net(x)
        with float_reference(net):
            honest = net(x)
        want_out = float_lit.model.eval()(x)
    torch.testing.assert_close(honest, want_out, rtol=0, atol=1e-4)
    assert float((plain - want_out).abs().max()) > 1e-4  # without it: AdaRound's rounded weights
