"""Pieces of the callbacks that need no Trainer: warmup detection, bisection, name matching, validation."""

from __future__ import annotations

import pytest
import torch
from cb_helpers import HandQuantNet

import qat_lightning as ql
from qat_lightning.callbacks import (
    Calibration,
    FakeQuantSwitch,
    PrepareQuantization,
    QuantAnalysisCallback,
    QuantizationAwareTraining,
    SanityCheck,
    bisect_float_blocks,
    bisect_model_blocks,
    block_patterns,
    calibrate,
    find_lr_warmup,
    float_ops,
    io_quant_nodes,
)
from qat_lightning.callbacks._common import default_input_fn, ensure_calibrated_flag, is_calibrated
from qat_lightning.callbacks.switch import match_name, matched_nodes


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


S = torch.optim.lr_scheduler


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda o: S.LinearLR(o, start_factor=0.1, total_iters=5), "LinearLR rises"),
        (lambda o: S.ConstantLR(o, factor=0.5, total_iters=3), "ConstantLR runs at 0.5x"),
        (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=100), "OneCycleLR"),
        (lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1), "CyclicLR"),
        (lambda o: S.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)), "factor rises from 0.1"),
        (
            lambda o: S.SequentialLR(
                o,
                [S.LinearLR(o, start_factor=0.2, total_iters=2), S.CosineAnnealingLR(o, 10)],
                milestones=[2],
            ),
            "SequentialLR contains a warmup: LinearLR",
        ),
        (lambda o: S.ChainedScheduler([S.ExponentialLR(o, 0.9), S.ConstantLR(o, factor=0.3)]), "Chained"),
    ],
)
def test_warmup_schedulers_are_found(make, needle):
    reason = find_lr_warmup(make(_opt()))
    assert reason is not None and needle in reason


@pytest.mark.parametrize(
    "make",
    [
        lambda o: S.CosineAnnealingLR(o, T_max=10),
        lambda o: S.StepLR(o, 5),
        lambda o: S.ExponentialLR(o, 0.9),
        lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=10),
        lambda o: S.ConstantLR(o, factor=1.0),
        lambda o: S.LambdaLR(o, lambda s: 0.95**s),
        lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5),
        lambda o: S.ReduceLROnPlateau(o),
    ],
)
def test_decay_schedulers_pass(make):
    assert find_lr_warmup(make(_opt())) is None


def test_bisect_finds_the_smallest_contiguous_block():
    blocks = [f"b{i}" for i in range(16)]
    culprits = {"b9", "b10"}  # both must be float to recover

    def evaluate(in_float):
        return 1.0 if culprits <= set(in_float) else 0.5

    result = bisect_float_blocks(blocks, evaluate, target=0.9)
    assert result.found and result.blocks == ("b9", "b10")
    assert result.metric == 1.0 and result.quantized_metric == 0.5
    assert len(result.probes) <= 2 + 2 * 4 + 1  # ~2 log2(n) probes


def test_bisect_edge_cases():
    good = bisect_float_blocks(["a", "b"], lambda s: 1.0, target=0.5)
    assert good.found and good.blocks == ()
    hopeless = bisect_float_blocks(["a", "b"], lambda s: 0.0, target=0.5)
    assert not hopeless.found and hopeless.blocks == ("a", "b")
    lower = bisect_float_blocks(
        ["a", "b", "c"], lambda s: 0.1 if "c" in s else 1.0, 0.2, higher_is_better=False
    )
    assert lower.blocks == ("c",)
    with pytest.raises(ValueError, match="at least one"):
        bisect_float_blocks([], lambda s: 0.0, 1.0)


def test_match_name_glob_and_prefix():
    assert match_name("head.*", "head.fc") and match_name("head.*", "head")
    assert match_name("head", "head#1") and not match_name("head", "header")
    assert match_name("*.fc", "head.fc") and not match_name("fc?", "fc1.x")


def _calibrated_hand_net():
    net = HandQuantNet()
    calibrate(net, [torch.randn(16, 8) for _ in range(4)])
    return net


def test_float_ops_restores_states_and_matches_fake_cast():
    net = _calibrated_hand_net()
    x = torch.randn(8, 8)
    ref = net(x)
    with float_ops(net, ["head.*"]) as names:
        assert names == ["head.fc"]
        assert all(n.state is ql.FakeQuantState.FLOAT for n in ql.quant_nodes_of(net.head.fc).values())
        assert net.fc1.output_quant.state is ql.FakeQuantState.VALIDATION
        partial = net(x)
    assert not torch.equal(partial, ref)
    assert torch.equal(net(x), ref)
    net.head.fc.output_quant.dtype = ql.float16
    _, nodes, unmatched = matched_nodes(net, ["head", "nope"], fake_cast=False)
    assert net.head.fc.output_quant not in nodes and unmatched == ["nope"]


def test_bisect_model_blocks_on_a_model():
    net = _calibrated_hand_net()
    x = torch.randn(32, 8)
    with ql.fake_quant_disabled(net):
        ref = net(x)

    def eval_fn(model):
        with torch.no_grad():
            return -float((model(x) - ref).abs().mean())

    assert block_patterns(net) == ["quant", "fc1", "head"]
    result = bisect_model_blocks(net, eval_fn, target=-1e-6)
    assert result.found and result.blocks == ("quant", "fc1", "head")  # every block contributes error
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(net))


def test_io_nodes_are_input_and_last_ops():
    net = HandQuantNet()
    assert [n for n, _ in io_quant_nodes(net)] == ["quant.output_quant", "head.fc.output_quant"]


def test_calibrate_sets_validation_and_restores_modes():
    net = HandQuantNet().train()
    used = calibrate(net, [torch.randn(4, 8)] * 3, num_batches=2)
    assert used == 2 and net.training
    assert all(n.state is ql.FakeQuantState.VALIDATION for _, n in ql.iter_fake_quantize(net))
    assert net.quant.output_quant.observer.num_batches == 2


def test_calibrated_flag_survives_state_dict_and_old_checkpoints():
    net = HandQuantNet()
    old = net.state_dict()  # saved before the flag existed
    ensure_calibrated_flag(net).fill_(True)
    other = HandQuantNet()
    ensure_calibrated_flag(other)
    other.load_state_dict(net.state_dict(), strict=True)
    assert is_calibrated(other)
    fresh = HandQuantNet()
    ensure_calibrated_flag(fresh)
    fresh.load_state_dict(old, strict=True)  # missing key filled in by the pre-hook
    assert not is_calibrated(fresh)


def test_default_input_fn():
    x = torch.ones(2)
    assert default_input_fn(x)[0] is x
    assert default_input_fn((x, 1))[0] is x
    assert default_input_fn({"a": x}) == {"a": x}


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: PrepareQuantization(method="magic"), "allowed: 'auto', 'fx', 'eager'"),
        (lambda: PrepareQuantization(qat_mode="bn"), "allowed: 'fuse_bn', 'with_bn', 'freeze_bn'"),
        (lambda: Calibration(num_batches=0), "num_batches must be an int >= 1"),
        (lambda: Calibration(dataloader="holdout"), "allowed: 'train', 'val', 'test'"),
        (lambda: QuantizationAwareTraining(fix_scales="some"), "allowed: None, 'input_output', 'all'"),
        (lambda: QuantizationAwareTraining(bn_mode="x"), "allowed: None, fuse_bn"),
        (lambda: FakeQuantSwitch(disable=[]), "non-empty"),
        (lambda: FakeQuantSwitch(stages=("fit", "train")), "allowed: fit, validate, test, predict"),
        (lambda: SanityCheck(mode="fp"), "allowed: lr0, float"),
        (lambda: SanityCheck(tolerance=-1), ">= 0"),
        (lambda: QuantAnalysisCallback(metrics=()), "at least one"),
    ],
)
def test_bad_arguments_fail_at_construction(build, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build()
