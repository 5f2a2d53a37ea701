"""probe_cache: search probes served from kept activations give the uncached search's values, bit for bit."""

from __future__ import annotations

import pytest
import torch
from analysis_toys import InplaceNet, calib_data, calibrate, calibrated, data, trace

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis, SearchConfig, search_mixed_precision
from qat_lightning.analysis.search.precision_nodes import collect_ops, raise_assignment
from qat_lightning.analysis.search.probe_cache import ActivationReuse
from qat_lightning.analysis.sensitivity.downstream import leaf_tensors
from qat_lightning.analysis.state import analysis_mode, node_dtypes


def _batches(n: int = 4) -> list[torch.Tensor]:
    return [data(16, seed) for seed in range(10, 10 + n)]


def _first(out):
    """Every output of the model, flattened per sample and concatenated (each branch counts)."""
    leaves = leaf_tensors(out)
    return torch.cat([t.reshape(len(leaves[0]), -1) for t in leaves], dim=1)


def _eval_fn(batches, model_ref, mode=torch.no_grad):
    with torch.no_grad(), ql.fake_quant_disabled(model_ref):
        refs = [_first(model_ref(b)) for b in batches]

    def eval_fn(m: torch.nn.Module) -> float:
        with mode():
            outs = [_first(m(b)) for b in batches]
        cos = torch.nn.functional.cosine_similarity
        return float(sum(cos(o, r, dim=1).sum() for o, r in zip(outs, refs, strict=True)))

    return eval_fn


def _reuse_note(plan) -> str:
    return next(n for n in plan.notes if n.startswith("activation reuse"))


def _searches(model, tables, eval_fn, target, **options):
    """The same search without and with reuse (both references): plans and probes must be identical."""
    off = search_mixed_precision(model, tables, eval_fn, target, **options)
    assert "activation reuse" not in " ".join(off.notes)  # off by default
    plans = [off]
    for reference in ("nearest", "base"):
        on = search_mixed_precision(
            model, tables, eval_fn, target, reuse_activations=True, cache_reference=reference, **options
        )
        assert on.probes == off.probes  # every probe's metric bit-identical
        assert (on.raised, on.ratios, on.metric, on.reached) == (
            off.raised,
            off.ratios,
            off.metric,
            off.reached,
        )
        plans.append(on)
    return plans


@pytest.mark.parametrize("outputs", ["single", "multi", "dict"])
@pytest.mark.parametrize("method", ["exact", "fast"])
def test_search_with_reuse_equals_search_without_on_a_residual_branching_graph(tmp_path, outputs, method):
    model = calibrated(outputs=outputs, fx_traced=True)  # fc2 + skip add, a second head off the add
    batches = _batches()
    eval_fn = _eval_fn(batches, model)
    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=batches[0], plot=False)
    with analysis_mode(model):
        base = eval_fn(model)
    served = 0
    for target in (base + 0.5 * (len(batches) * 16 - base), len(batches) * 16 - 1e-3):
        _, nearest, _ = _searches(model, tables, eval_fn, target, method=method, cost_aware=True)
        served += int(_reuse_note(nearest).split(": ")[1].split(" ")[0])
    assert served > 0  # the probes did run downstream-only


@pytest.mark.slow
def test_built_in_example_same_plan_and_probes_with_and_without_reuse(tmp_path) -> None:
    from qat_lightning.example import DigitsNet, load_digits_tensors

    torch.manual_seed(0)
    images, _ = load_digits_tensors()
    net = DigitsNet().eval()
    model = ql.prepare(net, images[:32])
    assert isinstance(model, torch.fx.GraphModule)
    calibrate(model, [images[:128]])
    model.eval()
    batches = list(images[128:224].split(32))
    eval_fn = _eval_fn(batches, model)
    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity("COSINE", inputs=batches[0], plot=False)
    low = search_mixed_precision(model, tables, eval_fn, 1e9, method="exact")
    base, full = low.probes[0].metric, low.probes[1].metric
    for method in ("exact", "fast"):
        _searches(model, tables, eval_fn, base + 0.9 * (full - base), method=method)


def _serve(model, reuse, dtypes, inputs):
    with node_dtypes(dtypes), analysis_mode(model), reuse.serving(), torch.no_grad():
        return [model(x) for x in inputs]


def _full(model, dtypes, inputs):
    with node_dtypes(dtypes), analysis_mode(model), torch.no_grad():
        return [model(x) for x in inputs]


def _bits_equal(a, b) -> bool:
    a, b = leaf_tensors(a), leaf_tensors(b)
    return len(a) == len(b) and all(
        torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=False)
    )


def test_first_changed_op_is_the_first_op_recomputes_everything() -> None:
    model = calibrated(outputs="multi", fx_traced=True)
    ops = collect_ops(model)
    first = raise_assignment([("quant", "activation")], ops, ql.qint16)[0]
    late = raise_assignment([("head", "activation")], ops, ql.qint16)[0]
    reuse, xs = ActivationReuse(model, 64), _batches(2)
    _serve(model, reuse, {}, xs)  # kept: the base run
    executed = reuse.counts["executed"]
    got = _serve(model, reuse, first, xs)
    assert _bits_equal(got, _full(model, first, xs))
    n_first = reuse.counts["executed"] - executed
    got = _serve(model, reuse, late, xs)
    assert _bits_equal(got, _full(model, late, xs))
    n_late = reuse.counts["executed"] - executed - n_first
    assert reuse.counts["served"] == 4 and reuse.counts["forward"] == 0
    quant_ops = [n for n in reuse.slicer.nodes if n.op == "call_module"]
    assert n_first >= 2 * len(quant_ops) and n_late < n_first  # from `quant` on: every op; `head`: fewer


def test_changes_on_parallel_branches_recompute_both() -> None:
    model = calibrated(outputs="multi", fx_traced=True)  # head and head2 both read the add: two branches
    ops = collect_ops(model)
    both = raise_assignment([("head2", "activation"), ("head", "weight")], ops, ql.qint16)[0]
    reuse, xs = ActivationReuse(model, 64), _batches(2)
    _serve(model, reuse, {}, xs)
    assert _bits_equal(_serve(model, reuse, both, xs), _full(model, both, xs))
    assert not _bits_equal(_full(model, both, xs), _full(model, {}, xs))  # the change is visible
    assert reuse.counts["served"] == 2


def test_shuffled_loader_falls_back_and_values_stay_equal(tmp_path) -> None:
    model = calibrated(fx_traced=True)
    pool = torch.cat(_batches())
    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=pool[:16], plot=False)

    def make_eval_fn():
        gen = torch.Generator().manual_seed(3)

        def eval_fn(m):
            x = pool[torch.randperm(len(pool), generator=gen)]  # a shuffling loader: other batches each call
            with torch.no_grad():
                return float(sum(m(b).square().mean() for b in x.split(16)))

        return eval_fn

    off = search_mixed_precision(model, tables, make_eval_fn(), 1e9, method="exact", reuse_activations=False)
    on = search_mixed_precision(model, tables, make_eval_fn(), 1e9, method="exact", reuse_activations=True)
    assert on.probes == off.probes
    assert "0 probe forwards ran only downstream" in _reuse_note(on)


def test_other_batch_count_training_mode_and_grad_fall_back() -> None:
    model = calibrated(fx_traced=True)
    ops = collect_ops(model)
    raised = raise_assignment([("big", "activation")], ops, ql.qint16)[0]
    reuse, xs = ActivationReuse(model, 64), _batches(3)
    _serve(model, reuse, {}, xs[:2])
    assert _bits_equal(_serve(model, reuse, raised, xs), _full(model, raised, xs))  # third call: no run
    assert reuse.counts["served"] == 2 and reuse.counts["recorded"] == 3
    assert _bits_equal(_serve(model, reuse, raised, xs[::-1]), _full(model, raised, xs[::-1]))
    with node_dtypes(raised), analysis_mode(model), reuse.serving():
        before = reuse.counts["forward"]
        with torch.enable_grad():
            model(xs[0])
        model.train()
        with torch.no_grad():
            model(xs[0])
        assert reuse.counts["forward"] == before + 2  # the real forward, nothing kept
    assert "forward" not in model.__dict__


def test_mutated_kept_tensors_are_never_used() -> None:
    model = calibrated(fx_traced=True)
    ops = collect_ops(model)
    raised = raise_assignment([("head", "activation")], ops, ql.qint16)[0]
    reuse, xs = ActivationReuse(model, 64), _batches(1)
    (out,) = _serve(model, reuse, {}, xs)
    out.mul_(0)  # the caller changes the model output in place: a kept tensor of the base run
    for node in reuse.runs[0][0].values:
        if node.op == "call_module" and node.target == "fc2":
            reuse.runs[0][0].values[node].add_(1.0)  # and an upstream activation
    assert _bits_equal(_serve(model, reuse, raised, xs), _full(model, raised, xs))
    assert reuse.counts["served"] == 0 and reuse.counts["recorded"] == 2
    with torch.no_grad():
        model.fc1.weight.add_(0.5)  # a weight changed: every kept run is stale
    assert _bits_equal(_serve(model, reuse, {}, xs), _full(model, {}, xs))
    assert reuse.counts["served"] == 0 and reuse.counts["recorded"] == 3


def test_inference_mode_is_served() -> None:
    model = calibrated(fx_traced=True)
    ops = collect_ops(model)
    raised = raise_assignment([("fc2", "activation")], ops, ql.qint16)[0]
    reuse, xs = ActivationReuse(model, 64), _batches(2)
    for dtypes in ({}, raised):
        with node_dtypes(dtypes), analysis_mode(model), reuse.serving(), torch.inference_mode():
            got = [model(x) for x in xs]
        assert _bits_equal(got, _full(model, dtypes, xs))
    assert reuse.counts["served"] == 2


def test_reuse_off_for_eager_in_place_and_over_budget(tmp_path) -> None:
    xs = _batches(2)
    eager = calibrated()
    inplace = trace(calibrate(InplaceNet(), [calib_data()]))
    for model, why, budget in (
        (eager, "not an fx GraphModule", 64),
        (inplace, "in-place ops", 64),
        (calibrated(fx_traced=True), "exceed the cache budget", 1e-4),
    ):
        tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=xs[0], plot=False)
        eval_fn = _eval_fn(xs, model)
        off = search_mixed_precision(model, tables, eval_fn, 1e9, method="exact", reuse_activations=False)
        on = search_mixed_precision(
            model, tables, eval_fn, 1e9, method="exact", reuse_activations=True, cache_budget_mb=budget
        )
        assert on.probes == off.probes and why in _reuse_note(on)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"cache_budget_mb": 0}, "cache_budget_mb"),
        ({"cache_budget_mb": -5.0}, "cache_budget_mb"),
        ({"cache_budget_mb": float("inf")}, "cache_budget_mb"),
        ({"cache_budget_mb": "1GB"}, "cache_budget_mb"),
        ({"cache_budget_mb": True}, "cache_budget_mb"),
        ({"reuse_activations": "yes"}, "reuse_activations"),
        ({"cache_reference": "last"}, "allowed: nearest, base"),
    ],
)
def test_search_config_validates_the_cache_options(option, match) -> None:
    with pytest.raises(ValueError, match=match):
        SearchConfig(**option)


def test_app_search_options_reach_the_search(tmp_path, monkeypatch) -> None:
    from qat_lightning.app import tuning
    from qat_lightning.app.config_checks import ConfigError
    from qat_lightning.cli import compose, to_app_config

    app = to_app_config(compose(["search.reuse_activations=true", "search.cache_budget_mb=64"]))
    assert (app.search.reuse_activations, app.search.cache_budget_mb) == (True, 64)
    assert to_app_config(compose([])).search.reuse_activations is False
    with pytest.raises(ConfigError, match="search.cache_budget_mb=0.0: must be a number > 0"):
        to_app_config(compose(["search.cache_budget_mb=0"]))
    seen = {}
    real = search_mixed_precision

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        seen["notes"] = plan.notes
        return plan

    monkeypatch.setattr("qat_lightning.analysis.search_mixed_precision", spy)
    model, xs = calibrated(fx_traced=True), _batches(2)
    tables = QuantAnalysis(model, out_dir=tmp_path).sensitivity(inputs=xs[0], plot=False)
    tuning.int16_search(
        model, tables, _eval_fn(xs, model), 1e9, "j6m", reuse_activations=True, cache_budget_mb=64
    )
    assert any(n.startswith("activation reuse (nearest)") for n in seen["notes"])


def test_inputs_that_cannot_be_matched_run_the_real_forward() -> None:
    from collections import namedtuple

    model = calibrated(fx_traced=True)
    reuse, x = ActivationReuse(model, 64), _batches(1)[0]
    pair = namedtuple("Pair", "a b")
    with analysis_mode(model), reuse.serving(), torch.no_grad():
        expected = reuse._forward(x)
        assert reuse.counts["recorded"] == 1
        assert _bits_equal(reuse._forward(x.clone().requires_grad_()), expected)
        for bad in (pair(x, x), object()):
            with pytest.raises((TypeError, AttributeError)):
                reuse._forward(bad)  # the real forward's own error: nothing was matched or kept
    assert reuse.counts["forward"] == 3 and reuse.counts["recorded"] == 1
