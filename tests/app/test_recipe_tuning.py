"""Recipe tuning in the app: fixed ratios mean what the searches report, troubleshoot tunes, fp16_max=0."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qat_lightning.app.checkpoints import read_checkpoint_info
from tests.app.helpers import run_app

J6P = ("stage=calibration", "chip=j6p", "recipe=gemm_int8_other_fp16")


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tuning_float")
    run_app(run_dir, "stage=float", "train.max_epochs=1")
    return run_dir / "checkpoints" / "float.ckpt"


def _raised(run_dir: Path) -> tuple:
    _, info = read_checkpoint_info(run_dir / "checkpoints" / "calibration.ckpt")
    return info.recipe.raised


def _decisions(run_dir: Path) -> str:
    return (run_dir / "summary.md").read_text()


def test_j6p_searched_ratio_pasted_back_gives_the_searched_rows(float_ckpt, tmp_path):
    run_app(tmp_path / "search", *J6P, "search.eval_batches=2", f"ckpt={float_ckpt}")
    plan = json.loads(next((tmp_path / "search").rglob("mixed_precision.json")).read_text())
    searched = tuple(tuple(row) for row in plan["raised"])
    assert plan["reached"] and searched and _raised(tmp_path / "search") == searched
    table = next((tmp_path / "search").rglob("sensitivity_0.json"))
    assert any(r["op_type"] in ("mean", "add", "cat") for r in json.loads(table.read_text())["rows"])
    fixed = (
        f"recipe.int16_ratio={plan['ratio']!r}",
        f"recipe.sensitivity_table={table}",
        f"ckpt={float_ckpt}",
    )
    run_app(tmp_path / "fixed", *J6P, *fixed)
    assert _raised(tmp_path / "fixed") == searched
    # the decision's count pasted back (its ratio is rounded for display: 5.6 % of 18 rows raised two)
    count = re.search(r"recipe\.int16_ratio=(\d+) raises the same", _decisions(tmp_path / "search"))
    assert count is not None and int(count.group(1)) == len(searched)
    run_app(tmp_path / "count", *J6P, f"recipe.int16_ratio={count.group(1)}", *fixed[1:])
    assert _raised(tmp_path / "count") == searched
    # a larger ratio still raises gemm rows only (other ops stay fp16 on j6p: their rows are no-ops)
    run_app(tmp_path / "half", *J6P, *fixed[1:], "recipe.int16_ratio=0.5")
    rows = {r["op_name"]: r["op_type"] for r in json.loads(table.read_text())["rows"]}
    assert all(
        rows[op] not in ("mean", "add", "cat", "mul", "sum", "softmax")
        for op, _ in _raised(tmp_path / "half")
    )


def test_troubleshoot_applies_the_recipe_tuning(float_ckpt, tmp_path):
    run_app(
        tmp_path, "stage=troubleshoot", "recipe=int8_int16", "recipe.int16_ratio=0.3", f"ckpt={float_ckpt}"
    )
    raised = _raised(tmp_path)
    assert raised and all(kind == "activation" for _, kind in raised)  # recipe.sensitive_type=activation
    assert "int16 ratio fixed by the recipe at 0.3" in _decisions(tmp_path)


def test_fp16_max_0_moves_no_op_to_fp16(float_ckpt, tmp_path):
    run_app(
        tmp_path,
        "stage=calibration",
        "recipe=int16_fp16",
        "recipe.fp16_topk=null",
        "pipeline.fp16_max=0",
        f"ckpt={float_ckpt}",
    )
    _, info = read_checkpoint_info(tmp_path / "checkpoints" / "calibration.ckpt")
    assert info.recipe.fp16_ops == ()
    assert "pipeline.fp16_max=0: no op moved to fp16" in _decisions(tmp_path)
    assert not (tmp_path / "checkpoints" / "calibration_int16.ckpt").exists()  # no search ran
