"""analysis/partial.py: the one op-name matcher (priority included), float_ops and its two halves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat_lightning as ql
import qat_lightning.callbacks.monitor as monitor
import qat_lightning.callbacks.switch as switch
import qat_lightning.quant.nodes.fp16_norm as fp16_norm
import qat_lightning.quant.qconfig.templates as templates
from qat_lightning.analysis import partial
from qat_lightning.quant.op_names import match_name, match_order
from qat_lightning.quant.ops import OpInfo, OpKind

pytestmark = pytest.mark.usefixtures("one_thread")


class SharedNorm(nn.Module):
    """One LayerNorm called twice (ops ``ln`` and ``ln#1``) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(x) + self.ln(2.0 * x))


def _prepared(dtype: ql.QuantDtype) -> nn.Module:
    chip = "j6p" if dtype == ql.float16 else None
    templates = [ql.ModuleNameTemplate({"": dtype})]
    setter = ql.QconfigSetter(ql.get_qconfig(), templates, chip=chip, on_violation="downgrade")
    return ql.prepare(SharedNorm().eval(), example_inputs=torch.randn(2, 8), qconfig_setter=setter)


def test_every_user_shares_the_one_matcher() -> None:
    for module in (templates, fp16_norm, switch, monitor, partial):
        assert module.match_name is match_name


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("head.*", "head", True),
        ("head.*", "head#1", True),
        ("head.*", "header", False),
        ("*.fc", "head.fc", True),
        ("fc?", "fc1.x", False),
        ("ln#1", "ln#1", True),
        ("ln#1", "ln", False),
        ("ln", "ln#1", True),
    ],
)
def test_match_name_globs_and_call_sites(pattern: str, name: str, expected: bool) -> None:
    assert match_name(pattern, name) is expected


def test_match_priority_most_specific_pattern_wins() -> None:
    assert match_order(["head.cls", "", "head.*", "head"]) == ["", "head", "head.*", "head.cls"]
    ops = [
        OpInfo("quant", "quant", OpKind.INPUT, "quant"),
        *(
            OpInfo(n, "ReLU", OpKind.OTHER, n, input_producers=("quant",))
            for n in ("head", "head.cls", "tail")
        ),
    ]
    template = ql.ModuleNameTemplate(
        {"head.cls": ql.float32, "": ql.qint16, "head.*": ql.float16, "head": ql.qint8}
    )
    setter = ql.QconfigSetter(ql.get_qconfig(), [template])
    got = {name: q.output_dtype for name, q in setter.assign(ops).qconfigs.items()}
    assert got == {"quant": ql.qint16, "head": ql.float16, "head.cls": ql.float32, "tail": ql.qint16}


def test_fp16_norm_prefix_uses_the_shared_matcher_including_call_sites() -> None:
    model = _prepared(ql.float16)
    assert fp16_norm.set_fp16_norm_scaling(model, False, prefix="ln#1") == ["ln#1"]
    assert fp16_norm.set_fp16_norm_scaling(model, False, prefix="ln") == ["ln", "ln#1"]
    assert fp16_norm.set_fp16_norm_scaling(model, True, prefix="l*") == ["ln", "ln#1"]


def test_float_ops_restores_each_node_state_even_on_error() -> None:
    model = _prepared(ql.qint8)
    ql.set_fake_quantize(model, ql.FakeQuantState.VALIDATION)
    names, nodes, unmatched = partial.matched_nodes(model, ["head", "nope"])
    assert names == ["head"] and nodes and unmatched == ["nope"]
    nodes[0].state = ql.FakeQuantState.CALIBRATION
    before = {id(n): n.state for _, n in ql.iter_fake_quantize(model)}
    with pytest.raises(RuntimeError, match="boom"), partial.float_ops(model, ["head"]) as inside:
        assert inside == ["head"]
        assert all(n.state == ql.FakeQuantState.FLOAT for n in nodes)
        raise RuntimeError("boom")
    assert {id(n): n.state for _, n in ql.iter_fake_quantize(model)} == before


def test_switch_halves_restore_a_node_listed_twice() -> None:
    node = ql.FakeQuantize(ql.qint8)
    node.state = ql.FakeQuantState.QAT
    saved = partial.switch_to_float([node, node])
    assert node.state == ql.FakeQuantState.FLOAT
    partial.restore_states(saved)
    assert node.state == ql.FakeQuantState.QAT
