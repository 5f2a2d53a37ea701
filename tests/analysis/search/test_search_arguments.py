"""The precision searches refuse bad inputs where they arrive: target, eval_fn's value, model, tables."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from analysis_toys import BrokenNet, calibrated, data

import qat_lightning as ql
from qat_lightning.analysis import (
    QuantAnalysis,
    SearchConfig,
    search_fp16_topk,
    search_j6p,
    search_mixed_precision,
)
from qat_lightning.quant.calibrate import UncalibratedModelError
from qat_lightning.quant.qconfig.sensitivity_table import SensitivityRow, SensitivityTable


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = calibrated()
    x = data(32, 3)
    (table,) = QuantAnalysis(model, out_dir=tmp_path_factory.mktemp("qa")).sensitivity(inputs=x, plot=False)

    def eval_fn(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(m(x).float().mean())

    return model, table, eval_fn


def _snapshot(model: torch.nn.Module) -> list:
    return [(n.dtype, n.state, n.scale.clone()) for _, n in ql.iter_fake_quantize(model)]


def _same(a: list, b: list) -> bool:
    return all(p[0] == q[0] and p[1] == q[1] and torch.equal(p[2], q[2]) for p, q in zip(a, b, strict=True))


SEARCHES = [search_mixed_precision, search_fp16_topk, search_j6p]


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize(
    ("target", "error"), [(math.nan, ValueError), (math.inf, ValueError), ("0.9", TypeError)]
)
def test_target_must_be_a_finite_number(setup, search, target, error) -> None:
    model, table, eval_fn = setup
    calls = []
    with pytest.raises(error, match="target must be a finite number"):
        search(model, table, lambda m: calls.append(1) or 1.0, target)
    assert calls == []  # refused before any probe


@pytest.mark.parametrize("search", SEARCHES)
def test_a_nan_metric_is_an_error_naming_the_probe_and_the_model_is_restored(setup, search) -> None:
    model, table, _ = setup
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"eval_fn returned nan at probe 'baseline'.*target"):
        search(model, table, lambda m: math.nan, 0.0)
    assert _same(before, _snapshot(model))


def test_a_nan_metric_later_in_the_search_names_that_probe(setup) -> None:
    model, table, eval_fn = setup
    values = iter([0.0, math.nan])  # baseline fails the target, then all_high gives NaN
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"eval_fn returned nan at probe 'all_high' \(\d+ rows? raised\)"):
        search_mixed_precision(model, table, lambda m: next(values), 1.0)
    assert _same(before, _snapshot(model))


@pytest.mark.parametrize("value", [None, "0.5", torch.ones(3)])
def test_eval_fn_must_return_a_number(setup, value) -> None:
    model, table, _ = setup
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        search_mixed_precision(model, table, lambda m: value, 0.0)


def test_a_one_element_tensor_metric_is_a_number(setup) -> None:
    model, table, eval_fn = setup
    plan = search_mixed_precision(model, table, lambda m: torch.tensor(eval_fn(m)), -1e9)
    assert plan.reached and plan.raised == ()


def test_a_plan_that_raises_nothing_has_ratio_zero(setup) -> None:
    model, table, _ = setup
    raised = {"n": 0}

    def worse_when_raised(m: torch.nn.Module) -> float:  # the all-int8 model is the best one
        raised["n"] = sum(n.dtype == ql.qint16 for _, n in ql.iter_fake_quantize(m))
        return -float(raised["n"])

    plan = search_mixed_precision(model, table, worse_when_raised, 1.0)
    assert not plan.reached and plan.raised == () and plan.ratio == 0.0 and set(plan.ratios) == {0.0}


@pytest.mark.parametrize("search", SEARCHES)
def test_a_float_model_is_refused(setup, search) -> None:
    _, table, eval_fn = setup
    with pytest.raises(ValueError, match="no quantized ops.*prepare"):
        search(torch.nn.Sequential(torch.nn.Linear(8, 4)), table, eval_fn, 0.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        search("model", table, eval_fn, 0.0)


@pytest.mark.parametrize("search", SEARCHES)
def test_an_uncalibrated_model_is_refused_as_quant_analysis_does(setup, search) -> None:
    _, table, eval_fn = setup
    uncalibrated = BrokenNet().eval()
    with pytest.raises(UncalibratedModelError, match="not calibrated"):
        QuantAnalysis(uncalibrated)
    with pytest.raises(
        UncalibratedModelError, match=rf"{search.__name__}: the model is not calibrated"
    ) as info:
        search(uncalibrated, table, eval_fn, 0.0)
    assert "strict" not in str(info.value)  # the searches have no strict= to offer


def _foreign(*names: str) -> SensitivityTable:
    return SensitivityTable(tuple(SensitivityRow(n, "activation", "Conv2d", 1.0, "qint8") for n in names))


@pytest.mark.parametrize("search", SEARCHES)
def test_a_table_of_another_model_is_refused(setup, search) -> None:
    model, _, eval_fn = setup
    with pytest.raises(ValueError, match=r"no row of the sensitivity table.*backbone\.conv9"):
        search(model, _foreign("backbone.conv9", "backbone.conv8"), eval_fn, 1e9)


def test_rows_naming_no_op_are_listed_in_a_warning(setup) -> None:
    model, table, eval_fn = setup
    mixed = SensitivityTable((*_foreign("backbone.conv9").rows, *table.rows), table.metric_name)
    with pytest.warns(UserWarning, match=r"these names match no op: backbone\.conv9$"):
        plan = search_mixed_precision(model, mixed, eval_fn, -1e9)
    assert plan.reached
    with pytest.warns(UserWarning, match=r"these names match no op: backbone\.conv9$"):
        search_fp16_topk(model, mixed, eval_fn, -1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search_mixed_precision(model, table, eval_fn, -1e9)  # a table of this model: no warning


def test_search_fp16_topk_takes_one_table(setup) -> None:
    model, table, eval_fn = setup
    with pytest.raises(TypeError, match=r"table must be one SensitivityTable.*got list.*tables\[0\]"):
        search_fp16_topk(model, [table], eval_fn, 0.0)


@pytest.mark.parametrize(("max_k", "error"), [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_search_fp16_topk_max_k_is_a_positive_int(setup, max_k, error) -> None:
    model, table, eval_fn = setup
    with pytest.raises(error, match="max_k must be a positive int"):
        search_fp16_topk(model, table, eval_fn, 0.0, max_k=max_k)


def test_search_fp16_topk_higher_is_better_is_a_bool(setup) -> None:
    model, table, eval_fn = setup
    with pytest.raises(TypeError, match="higher_is_better must be True or False"):
        search_fp16_topk(model, table, eval_fn, 0.0, higher_is_better="no")


@pytest.mark.parametrize("flag", ["cost_aware", "higher_is_better"])
def test_search_flags_are_bools(setup, flag) -> None:
    model, table, eval_fn = setup
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        search_mixed_precision(model, table, eval_fn, 0.0, **{flag: "no"})


@pytest.mark.parametrize("search", SEARCHES)
def test_eval_fn_must_be_callable(setup, search) -> None:
    model, table, _ = setup
    with pytest.raises(TypeError, match="eval_fn must be a callable"):
        search(model, table, 3, 0.0)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"chip": "j7"}, ValueError, "unknown chip 'j7'"),
        ({"op_filter": 3}, TypeError, "op_filter must be a callable"),
        ({"base_dtypes": {1: "qint16"}}, TypeError, "base_dtypes keys must be FakeQuantize nodes"),
        ({"max_cost_probes": 1.5}, ValueError, "max_cost_probes must be None or an int >= 0"),
        ({"max_cost_probes": -1}, ValueError, "max_cost_probes must be None or an int >= 0"),
    ],
)
def test_search_config_refuses_values_that_would_fail_later(options, error, match) -> None:
    with pytest.raises(error, match=match):
        SearchConfig(**options)


def test_search_config_base_dtypes_values_are_dtypes(setup) -> None:
    model, _, _ = setup
    node = next(n for _, n in ql.iter_fake_quantize(model))
    with pytest.raises(ValueError, match="unknown quantization dtype 'int4'"):
        SearchConfig(base_dtypes={node: "int4"})
    assert SearchConfig(base_dtypes={node: "qint16"}, chip="j6m", op_filter=lambda op: True)
