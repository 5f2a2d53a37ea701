"""prepare() tells the truth: inline modules traced (DistilBERT through fx), float32 ops reported and
checked against the chip, switches inside forward honoured by fx like eager, jit_strip."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qat_lightning.quant import (
    FakeCast,
    FxTraceError,
    GlobalFakeQuantSwitch,
    QconfigSetter,
    check_model,
    prepare,
    set_fake_quantize,
)
from tests.models import GeluResidual

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")


def _distilbert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    config = transformers.DistilBertConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=16
    )
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    inputs = {
        "input_ids": torch.randint(0, 50, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    return model, inputs


def test_distilbert_goes_through_fx_with_only_the_masks_left_float(tmp_path):
    model, inputs = _distilbert()
    prepared = prepare(model, inputs, method="fx", check_dir=tmp_path)
    record = prepared.prepare_record
    assert record.method == "fx"
    # sdpa's mask step is the eager attention's mask add: float32, with the mask-like reason
    assert [(op.name, op.op_type) for op in record.float_ops] == [
        (f"distilbert.transformer.layer.{i}.attention.add", "add") for i in range(2)
    ]
    assert all("mask-like" in op.reason for op in record.float_ops)
    types = {op.op_type for op in prepared.op_infos} if hasattr(prepared, "op_infos") else None
    del types
    names = prepared.quant_op_order
    assert "pre_classifier" in names  # nn.ReLU()(x) built in forward: traced, fused into LinearReLU
    assert sum(n.endswith("gelu") for n in names) == 2
    text = (tmp_path / "model_check_result.txt").read_text()
    assert "Not quantized (float32): 2 op(s)" in text
    with torch.no_grad():
        ref = model(**inputs).logits
        set_fake_quantize(prepared, "float")
        out = prepared(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


class _InlineWithWeights(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear(4, 4)(x)  # new weights on every call: refused by fx


def test_inline_module_with_weights_is_refused_naming_the_line():
    with pytest.raises(
        FxTraceError, match=r"built inside forward[\s\S]*test_prepare_honesty.py:\d+: return nn.Linear"
    ):
        prepare(_InlineWithWeights(), torch.randn(2, 4), method="fx")


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the offending line
            return self.fc(x)
        return x


def test_fx_failure_shows_the_user_source_line():
    with pytest.raises(FxTraceError) as info:
        prepare(_DataDependent(), torch.ones(2, 4), method="fx")
    assert "test_prepare_honesty.py:" in str(info.value)
    assert "if x.sum() > 0:  # the offending line" in str(info.value)


def test_eager_float_ops_are_reported_with_their_share(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(GeluResidual().eval(), torch.randn(2, 8), method="eager", check_dir=tmp_path)
    floats = {op.name: op for op in prepared.prepare_record.float_ops}
    assert set(floats) == {"gelu", "add"}
    assert floats["gelu"].flops == 16 and floats["add"].flops == 16
    report = check_model(prepared)
    summary = {r.dtype: r for r in report.dtype_summary}
    # x_quant 16 + a 128 + b 128 (fed by the float add: computes float32) + gelu 16 + add 16 = 304 FLOPs
    assert summary["qint8"].flops == 16 + 128
    assert summary["float32"].ops == 3 and summary["float32"].flops == 128 + 16 + 16
    assert report.float_flop_share == pytest.approx(32 / 304)
    rows = {r.name: r for r in report.out_qconfigs}
    assert rows["gelu"].quantized.startswith("no") and rows["a"].quantized == "yes"
    text = (tmp_path / "model_check_result.txt").read_text()
    assert "Not quantized (float32): 2 op(s) without quant points, 10.53% of FLOPs" in text


@pytest.mark.parametrize("chip", ["j6e", "j6m", "j6p"])
def test_float_ops_the_chip_cannot_run_are_violations(chip):
    model, x = GeluResidual().eval(), torch.randn(2, 8)
    match = rf"{chip} cannot run these float32 ops[\s\S]*gelu[\s\S]*add[\s\S]*b \(Linear"
    with pytest.raises(ValueError, match=match):
        prepare(model, x, method="eager", qconfig_setter=QconfigSetter(chip=chip))
    setter = QconfigSetter(chip=chip, on_violation="downgrade")
    with pytest.warns(UserWarning, match="they stay float32"):
        prepared = prepare(model, x, method="eager", qconfig_setter=setter)
    assert any(n.startswith("chip violation") for n in prepared.prepare_record.notes)
    assert (
        prepare(model, x, method="fx", qconfig_setter=QconfigSetter(chip=chip)).prepare_record.float_ops == ()
    )


# ------------------------------------------------------------------------------------ switches in forward
class _HeadOff(nn.Module):
    """The guide's partial quantization: fake quant (and fake cast) off around the head."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.backbone = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.backbone(x)
        GlobalFakeQuantSwitch.disable()
        FakeCast.disable()
        x = self.head(x)
        GlobalFakeQuantSwitch.enable()
        FakeCast.enable()
        return self.dequant(x)


def _calibrated(model: nn.Module, method: str, batches: list[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model, batches[0], method=method)
    set_fake_quantize(prepared, "calibration")
    with torch.no_grad():
        for b in batches:
            prepared(b)
    set_fake_quantize(prepared, "validation")
    return prepared


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_switches_inside_forward_are_honoured(method, seed):
    torch.manual_seed(0)
    model = _HeadOff().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    prepared = _calibrated(model, method, batches)
    assert prepared.prepare_record.method == method
    floats = {op.name for op in prepared.prepare_record.float_ops}
    assert floats == {"head"}
    x = batches[0]
    with torch.no_grad():
        out = prepared(x)
        assert GlobalFakeQuantSwitch.enabled() and FakeCast.enabled()
        # head runs float: the output is the float head applied to the (quantized) backbone output
        feat = prepared.get_submodule("backbone")(prepared.get_submodule("quant")(x))
        torch.testing.assert_close(out, model.head(feat))  # the head ran float on the quantized features


def test_switch_fx_and_eager_agree(seed):
    torch.manual_seed(0)
    model = _HeadOff().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    fx_model = _calibrated(model, "fx", batches)
    eager_model = _calibrated(model, "eager", batches)
    with torch.no_grad():
        a, b = fx_model(batches[1]), eager_model(batches[1])
        GlobalFakeQuantSwitch.disable()
        try:
            float_out = model(batches[1])
        finally:
            GlobalFakeQuantSwitch.enable()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, float_out)  # the backbone is still quantized


# -------------------------------------------------------------------------------------------- jit_strip
class _Stripped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.quant = QuantStub()
        self.body = nn.Linear(8, 8)
        self.dequant = DeQuantStub()
        self.post = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x) * 2.0
        x = self.dequant(torch.relu(self.body(self.quant(x))))
        return self.post(x) + 1.0


def test_jit_strip_quantizes_only_between_the_stubs(tmp_path):
    model, x = _Stripped().eval(), torch.randn(4, 8)
    prepared = prepare(model, x, method="jit_strip", check_dir=tmp_path)
    assert prepared.prepare_record.method == "jit_strip"
    assert prepared.quant_op_order == ["quant", "body"]  # body + relu fused
    outside = {op.name: op for op in prepared.prepare_record.float_ops}
    assert set(outside) == {"pre", "mul", "post", "add"}
    assert not any(op.on_chip for op in outside.values())
    full = prepare(model, x, method="fx")
    assert {"pre", "post"} <= set(full.quant_op_order)
    with torch.no_grad():
        set_fake_quantize(prepared, "float")
        torch.testing.assert_close(prepared(x), model(x))
    # outside the stubs is not a chip violation: the deployment strips it off
    prepare(model, x, method="jit_strip", qconfig_setter=QconfigSetter(chip="j6e"))
    assert "outside the QuantStub .. DeQuantStub region" in (tmp_path / "model_check_result.txt").read_text()


def test_jit_strip_without_stubs_is_refused():
    with pytest.raises(ValueError, match="calls no QuantStub"):
        prepare(GeluResidual(), torch.randn(2, 8), method="jit_strip")


class _HeadOffContext(_HeadOff):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(self.quant(x))
        with GlobalFakeQuantSwitch.disabled():
            x = self.head(x)
        return self.dequant(x)


@pytest.mark.parametrize("method", ["fx", "eager"])
def test_switch_context_manager_inside_forward(method, seed):
    model = _HeadOffContext().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    prepared = _calibrated(model, method, batches)
    assert {op.name for op in prepared.prepare_record.float_ops} == {"head"}
    with torch.no_grad():
        out = prepared(batches[0])
        assert GlobalFakeQuantSwitch.enabled()
        feat = prepared.get_submodule("backbone")(prepared.get_submodule("quant")(batches[0]))
        torch.testing.assert_close(out, model.head(feat))


class _EmbeddingIntoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(10, 8)  # a float lookup (nn.Embedding itself is quantized per row)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


def test_a_gemm_fed_by_an_unquantized_op_is_a_float32_gemm_violation():
    model, ids = _EmbeddingIntoLinear().eval(), torch.randint(0, 10, (2, 5))
    assert prepare(model, ids, method="fx").prepare_record.float_ops == ()
    with pytest.raises(ValueError, match=r"j6e cannot run these float32 ops[\s\S]*fc \(Linear"):
        prepare(model, ids, method="fx", qconfig_setter=QconfigSetter(chip="j6e"))


def test_debugging_switches_are_not_chip_violations():
    prepared = _calibrated(_HeadOff().eval(), "fx", [torch.randn(4, 8)])
    assert [op.on_chip for op in prepared.prepare_record.float_ops] == [False]
    prepare(_HeadOff().eval(), torch.randn(4, 8), method="fx", qconfig_setter=QconfigSetter(chip="j6e"))
