"""The README's promises: its first commands, and the Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_setup_and_main_job_then_tests() -> None:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert blocks[0].split("\n")[:2] == ['pip install -c constraints.txt -e ".[dev]"', "qat-lightning"]
    assert blocks[1].strip() == "python -m pytest tests"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    plan = namespace["plan"]
    assert plan.metric >= 0.999
    assert (tmp_path / "model_check_result.txt").exists()
    assert (tmp_path / "quant_analysis" / "compare_per_layer.txt").exists()
    assert (tmp_path / "quant_analysis" / "compare_export_per_layer.txt").exists()
    points = namespace["deployed"].export_comparison.rows
    assert points[0].op_name == "x_quant" and all(r.max_steps <= 1.001 for r in points if r.role == "weight")
