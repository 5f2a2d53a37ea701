"""The package layout (issue 16): no import circles, no oversized modules, every module importable."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qat_lightning"
MAX_LINES = 400

#: Modules still over MAX_LINES, each owned by another helper of issue 12/15/16 who edits it in this
#: round (splitting them here would collide with those edits). The test fails for any module over the
#: limit that is not listed, and warns when a listed one is back under it (drop it from the list).
OVERSIZED = {
    "qat_lightning/analysis/search/mixed_precision.py": "h14b rewrites the search (issue 14 item 5)",
    "qat_lightning/app/schema.py": "h12c (issue 16 item 3: one vocabulary)",
    "qat_lightning/app/session.py": "h12c (app contents)",
    "qat_lightning/callbacks/prepare.py": "no single owner; h12b and h15 edit it this round",
    "qat_lightning/quant/fake_quantize.py": "h15 (quant node, quant/nodes/)",
    "qat_lightning/quant/observers.py": "h15 (quant/observers/)",
    "qat_lightning/quant/qat_modules.py": "h15 (quant/nodes/)",
    "qat_lightning/quant/preparation/tables.py": "h12b (issue 12 items 6-8)",
}


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


#: Import circles another helper is removing in this round: ``observers.py`` imports its own subclasses at
#: the bottom (h15 moves the observers into ``quant/observers/`` and breaks it there).
KNOWN_CIRCLES = [
    {
        "qat_lightning.quant.observers",
        "qat_lightning.quant.observers.histogram_observers",
        "qat_lightning.quant.observers.range_observers",
    },
]


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "with-function-imports"])
def test_no_import_circles(top_level_only: bool) -> None:
    graph = import_graph(package_modules(), top_level_only)
    assert sum(map(len, graph.values())) > 100, "the graph builder found (almost) no imports"
    assert [c for c in import_circles(graph) if c not in KNOWN_CIRCLES] == []


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
    over = {p for p, n in sizes.items() if n > MAX_LINES}
    assert over - set(OVERSIZED) == set(), {p: sizes[p] for p in over - set(OVERSIZED)}
    back_under = {p for p in OVERSIZED if p in sizes and sizes[p] <= MAX_LINES}
    if back_under:
        warnings.warn(f"within {MAX_LINES} lines now, unlist: {sorted(back_under)}", stacklevel=1)
