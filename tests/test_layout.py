"""The package layout (issue 16): no import circles, no oversized modules, every module importable."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qat_lightning"
MAX_LINES = 400


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _imports(tree: ast.AST, top_level_only: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement outside ``if TYPE_CHECKING:`` (optionally not inside functions/classes)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                stack.extend(child.orelse)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif not (
                top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            ):
                stack.append(child)
    return found


def import_graph(modules: dict[str, pathlib.Path], top_level_only: bool) -> dict[str, set[str]]:
    """``module -> modules of this package it imports`` (``from pkg import sub`` counts as ``pkg.sub``)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path)), top_level_only):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [s if s in modules else base for s in subs]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The import circles: strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(component)

    for start in sorted(graph):
        if start not in index:
            visit(start)
    return circles


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "with-function-imports"])
def test_no_import_circles(top_level_only: bool) -> None:
    graph = import_graph(package_modules(), top_level_only)
    assert sum(map(len, graph.values())) > 100, "the graph builder found (almost) no imports"
    assert import_circles(graph) == []


def test_circle_finder_sees_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(map(sorted, import_circles(graph))) == [["a", "b", "c"], ["d", "e"]]
    assert import_circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_import_graph_resolves_submodules_and_skips_type_checking(tmp_path: pathlib.Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from qat_lightning.quant import qconfig\n"
        "from qat_lightning.quant.qconfig import QConfig\n"
        "if TYPE_CHECKING:\n    from qat_lightning.app import session\n"
        "def f():\n    import qat_lightning.chips\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    modules = {**package_modules(), "probe": probe}
    assert import_graph(modules, True)["probe"] == {"qat_lightning.quant.qconfig"}
    assert import_graph(modules, False)["probe"] == {"qat_lightning.quant.qconfig", "qat_lightning.chips"}


def test_every_module_imports() -> None:
    """Every module imports in a fresh interpreter (parents first: the order users hit)."""
    names = [n for n in package_modules() if n != "qat_lightning.__main__"]
    code = (
        "import importlib, json\n"
        f"names = {names!r}\n"
        "print(json.dumps([importlib.import_module(n).__name__ for n in names]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 2 * len(names)


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 100, "the size check found (almost) no modules"
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


MAX_FUNCTION_LINES = 80

#: Functions still over MAX_FUNCTION_LINES (definition line to last line, docstring included). The aim is
#: 60 lines where reasonable; these are left for a later round. A function not listed fails the test.
LONG_FUNCTIONS = {
    "qat_lightning/analysis/compare/bad_case.py:find_bad_cases",
    "qat_lightning/quant/observers/kl_search.py:kl_threshold",
    "qat_lightning/quant/preparation/fusion.py:find_fusions",
    "qat_lightning/quant/preparation/model_check.py:check_model",
}


def long_functions(limit: int) -> dict[str, int]:
    """``"path:function" -> lines`` of every function (methods and nested ones too) over ``limit`` lines."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > limit:
                    found[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    return found


def test_no_function_over_80_lines() -> None:
    long = long_functions(MAX_FUNCTION_LINES)
    assert len(long_functions(20)) > 50, "the function scan found (almost) no functions"
    assert {k: n for k, n in long.items() if k not in LONG_FUNCTIONS} == {}
    assert LONG_FUNCTIONS - set(long) == set(), "within the limit now: drop them from LONG_FUNCTIONS"
