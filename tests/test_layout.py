"""The package's shape: the layout table of the docs (docs/layout.md) names every module and
nothing else, and the modules import each other without a cycle (imports for type checking only
are not counted). Modules are split by responsibility, never by size, so no line count is
enforced."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytaskqml"
LIBRARY_ONLY = {"__init__.py", "__main__.py"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.name not in LIBRARY_ONLY)


def test_the_docs_layout_table_matches_the_package() -> None:
    table = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"`pytaskqml/(\w+\.py)`", table))
    assert listed == {p.name for p in modules()}


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, typing_only)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 1 and not typing_only:
            if node.module:
                found.add(node.module)
            else:
                found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, typing_only)

    visit(tree, False)
    return {m for m in found if (PACKAGE / f"{m}.py").exists()}


def test_modules_import_each_other_without_a_cycle() -> None:
    graph = {p.stem: _runtime_imports(p) for p in modules()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                walk(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
