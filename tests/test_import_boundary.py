"""The plain-torch core (quant/, analysis/, ptq/) never imports lightning, hydra or omegaconf."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qat_lightning"
CORE_DIRS = [PACKAGE / "quant", PACKAGE / "analysis", PACKAGE / "ptq"]
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def core_packages() -> list[str]:
    return [f"qat_lightning.{d.name}" for d in CORE_DIRS if (d / "__init__.py").exists()]


def core_files() -> list[pathlib.Path]:
    return sorted(p for d in CORE_DIRS if d.is_dir() for p in d.rglob("*.py"))


def run_python(code: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


IMPORT_AND_REPORT = """
import importlib, json, pkgutil, sys
names = {names!r}
walk = {walk!r}
for name in names:
    module = importlib.import_module(name)
    if walk:
        for info in pkgutil.walk_packages(module.__path__, name + "."):
            importlib.import_module(info.name)
forbidden = {forbidden!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
ours = sorted(m for m in sys.modules if m.startswith("qat_lightning"))
print(json.dumps({{"loaded": loaded, "modules": ours}}))
"""


def test_core_packages_exist() -> None:
    assert "qat_lightning.quant" in core_packages()


def test_importing_the_core_loads_no_framework() -> None:
    report = run_python(IMPORT_AND_REPORT.format(names=core_packages(), walk=False, forbidden=FORBIDDEN))
    assert report["loaded"] == []
    assert "qat_lightning.quant" in report["modules"]


def test_importing_every_core_module_loads_no_framework() -> None:
    report = run_python(IMPORT_AND_REPORT.format(names=core_packages(), walk=True, forbidden=FORBIDDEN))
    assert report["loaded"] == []
    expected = {
        "qat_lightning." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in core_files()
        if p.name != "__init__.py"
    }
    assert expected <= set(report["modules"])


_DYNAMIC = re.compile(r"""(import_module|__import__)\(\s*["'](""" + "|".join(FORBIDDEN) + r""")\b""")


def forbidden_imports(source: str, label: str) -> list[str]:
    """``label:line`` of every import of a forbidden package, including ones inside functions."""
    hits = []
    for node in ast.walk(ast.parse(source, filename=label)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name.split(".")[0] in FORBIDDEN for name in names):
            hits.append(f"{label}:{node.lineno}")
    for match in _DYNAMIC.finditer(source):
        hits.append(f"{label}:{source[: match.start()].count(chr(10)) + 1}")
    return hits


def test_no_core_file_imports_a_framework() -> None:
    files = core_files()
    assert files, "no core files found"
    hits = [hit for path in files for hit in forbidden_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert hits == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import lightning\n", True),
        ("import lightning.pytorch as pl\n", True),
        ("import os, hydra\n", True),
        ("from pytorch_lightning import Trainer\n", True),
        ("def f():\n    import hydra\n", True),
        ("from omegaconf import DictConfig\n", True),
        ("x = importlib.import_module('lightning.pytorch')\n", True),
        ("import torch\nfrom .lightning_free import x\n", False),
        ("import lightning_utils_of_ours\n", False),
        ("# import lightning\nimport torch\n", False),
    ],
)
def test_static_check_detects_imports(source, found) -> None:
    assert bool(forbidden_imports(source, "probe.py")) is found
