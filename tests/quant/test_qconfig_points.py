"""Which quant point a QConfig field reaches, through ``prepare`` (fx and eager), templates and the check.

* a fixed threshold / ``fixed_scale`` fixes the op's *output* scale only: its input points calibrate;
* so a threshold alone never yields a fixed float input node (no false "no effect" prompt);
* ``QConfig.ch_axis`` is either the op's own weight axis or rejected, never ignored;
* an ``observer`` set for a more specific name beats a threshold inherited from a broader one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
from qat_lightning.quant.ops import OpInfo, OpKind
from qat_lightning.quant.qconfig.qconfig import QConfig

METHODS = ("fx", "eager")


class TwoLinear(nn.Module):
    """Linear -> ReLU -> Linear ``fc`` (the auditor's model; a ReLU module so eager mode sees it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.pre(x)))


class UpHead(nn.Module):
    """Conv -> ConvTranspose ``up`` (weight channel axis 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.conv(x)))


def _prepare(model: nn.Module, x: torch.Tensor, templates: list, method: str, chip: str | None = None):
    setter = ql.QconfigSetter(reference_qconfig=ql.get_qconfig(), templates=templates, chip=chip)
    return ql.prepare(model.eval(), example_inputs=x, qconfig_setter=setter, method=method)


def _calibrate_capturing(prepared: nn.Module, node: nn.Module, batches: list) -> torch.Tensor:
    """Calibrate ``prepared``; return everything ``node`` saw."""
    seen: list[torch.Tensor] = []
    handle = node.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        ql.calibrate(prepared, batches)
    finally:
        handle.remove()
    return torch.cat([t.reshape(-1) for t in seen])


# ------------------------------------------------------------------- 1. a fixed scale is an output scale
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gain", [1.0, 100.0])
def test_fixed_scale_pins_the_output_only_and_the_gemm_input_calibrates(seed, method, gain) -> None:
    qc = ql.get_qconfig(in_dtype=ql.qint16, out_dtype=ql.qint8, fixed_scale=0.5, observer="minmax")
    x = torch.randn(256, 8) * gain
    prepared = _prepare(TwoLinear(), x, [ql.ModuleNameTemplate({"fc": qc})], method, chip="j6m")
    fc = prepared.get_submodule("fc")
    node = fc.input_quant[0]
    assert node.dtype == ql.qint16 and not node.is_fixed and node.observer_name == "minmax"
    seen = _calibrate_capturing(prepared, node, [x] * 4)
    amax = float(seen.abs().max())
    # the observer's scale of the data it saw (minmax: amax / qmax), not the rescaled threshold 0.5*127/32767
    assert float(node.scale) == pytest.approx(amax / ql.qint16.qmax, rel=1e-6)
    assert float(node.scale) != pytest.approx(0.5 * 127 / 32767, rel=1e-3)
    assert int((seen.abs() > float(node.scale) * ql.qint16.qmax * (1 + 1e-6)).sum()) == 0  # nothing clipped
    out = fc.output_quant
    assert out.is_fixed and out.observer_name == "fixed" and float(out.scale) == pytest.approx(0.5)


def test_qconfig_input_points_never_take_the_threshold() -> None:
    qc = ql.get_qconfig(observer="kl", threshold=200.0)
    assert qc.activation_fake_quant(ql.qint8, "op.output").is_fixed
    node = qc.activation_fake_quant(ql.qint16, "op.input.0", output=False)
    assert not node.is_fixed and node.observer_name == "kl"


# ----------------------------------------------------- 2. no false "fixed scale on a float input" prompt
def _fixed_float_prompts(prepared: nn.Module) -> list[tuple[str, str]]:
    report = ql.check_model(prepared)
    return [(r.name, r.msg) for r in report.prompts if "has no effect on a float node" in r.msg]


@pytest.mark.parametrize("method", METHODS)
def test_a_threshold_alone_builds_no_fixed_float_input(seed, method) -> None:
    x = torch.randn(64, 8)
    prepared = _prepare(TwoLinear(), x, [ql.ModuleNameTemplate({"fc": {"threshold": 200.0}})], method, "j6m")
    fc = prepared.get_submodule("fc")
    assert fc.input_quant[0].dtype == ql.float32 and not fc.input_quant[0].is_fixed
    assert fc.output_quant.is_fixed and float(fc.output_quant.scale) == pytest.approx(200.0 / 127)
    assert _fixed_float_prompts(prepared) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_threshold_on_a_float_output_is_still_reported(seed, method) -> None:
    x = torch.randn(64, 8)
    names = ql.ModuleNameTemplate({"fc": {"dtype": ql.float16, "threshold": 200.0}})
    prepared = _prepare(TwoLinear(), x, [names], method)
    prompts = _fixed_float_prompts(prepared)
    assert len(prompts) == 1 and prompts[0][0] == "fc" and "output" in prompts[0][1]


# ------------------------------------------------------------------------- 3. ch_axis: honoured or refused
@pytest.mark.parametrize("method", METHODS)
def test_ch_axis_other_than_the_weight_axis_is_refused(seed, method) -> None:
    x = torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"fc: QConfig.ch_axis=1 .*allowed: None or 0"):
        _prepare(TwoLinear(), x, [ql.ModuleNameTemplate({"fc": QConfig(ch_axis=1)})], method)
    with pytest.raises(ValueError, match=r"up: QConfig.ch_axis=0 .*allowed: None or 1"):
        _prepare(
            UpHead(), torch.randn(1, 3, 4, 4), [ql.ModuleNameTemplate({"up": QConfig(ch_axis=0)})], method
        )


@pytest.mark.parametrize("method", METHODS)
def test_ch_axis_equal_to_the_weight_axis_is_used(seed, method) -> None:
    assert QConfig().ch_axis is None
    with pytest.raises(ValueError, match="ch_axis"):
        QConfig(ch_axis=True)  # type: ignore[arg-type]
    for axis in (0, -2, None):
        prepared = _prepare(
            TwoLinear(), torch.randn(16, 8), [ql.ModuleNameTemplate({"fc": QConfig(ch_axis=axis)})], method
        )
        weight = prepared.get_submodule("fc").weight_quant
        assert weight.ch_axis == 0 and weight.scale.shape == (4,)
    templates = [ql.ModuleNameTemplate({"up": QConfig(ch_axis=1)})]
    weight = _prepare(UpHead(), torch.randn(1, 3, 4, 4), templates, method).get_submodule("up").weight_quant
    assert weight.ch_axis == 1 and weight.scale.shape == (6,)


# --------------------------------------------------- 4. a specific observer beats an inherited threshold
@pytest.mark.parametrize("method", METHODS)
def test_a_specific_observer_clears_a_broader_threshold(seed, method) -> None:
    names = ql.ModuleNameTemplate({"": {"threshold": 10.0}, "fc": {"observer": "kl"}})
    prepared = _prepare(TwoLinear(), torch.randn(64, 8), [names], method)
    out = prepared.get_submodule("fc").output_quant
    assert out.observer_name == "kl" and not out.is_fixed
    pre = prepared.get_submodule("pre").output_quant
    assert pre.is_fixed and float(pre.scale) == pytest.approx(10.0 / 127)


def test_observer_with_its_own_threshold_keeps_the_threshold() -> None:
    ops = [OpInfo("fc", "Linear", OpKind.GEMM, "fc")]
    setter = ql.QconfigSetter(
        templates=[
            ql.ModuleNameTemplate({"": {"threshold": 10.0}, "fc": {"observer": "kl", "threshold": 5.0}})
        ]
    )
    qc = setter.assign(ops).qconfigs["fc"]
    assert qc.observer == "kl" and qc.fixed_threshold == 5.0
    cleared = ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(threshold=3.0),
        templates=[ql.ModuleNameTemplate({"fc": {"observer": "kl"}})],
    )
    assert cleared.assign(ops).qconfigs["fc"].fixed_threshold is None
