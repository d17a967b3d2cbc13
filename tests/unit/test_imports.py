"""The package's import graph: no circles and no layer importing a higher one (ARCHITECTURE.md).

Imports inside functions count too: deferring an import hides a circle from Python, not from a
reader, and "lower layers never import higher ones" holds for every import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ctscan

SRC = Path(ctscan.__file__).parent
# ARCHITECTURE.md: cli -> serve -> ops -> inference -> engine -> data -> models / settings / errors
LAYERS = {"cli": 6, "serve": 5, "ops": 4, "inference": 3, "engine": 2, "data": 1}
LAYERS |= dict.fromkeys(("models", "settings", "errors"), 0)


def _module_name(path: Path, root: Path) -> str:
    parts = ("ctscan", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """ctscan module -> the ctscan modules it imports anywhere in its body (`root`: the package)."""
    files = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import submodule` imports the submodule; `from pkg import name`, pkg
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import ctscan.x.y` of a non-module name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per back edge met in a depth-first walk (empty when the graph is acyclic)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'module -> target' for every import of a higher layer."""

    def layer(module: str) -> int:
        return LAYERS.get(module.split(".")[1], -1) if "." in module else -1

    return [
        f"{name} -> {target}"
        for name, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer(name) >= 0 and layer(target) > layer(name)
    ]


def test_the_package_has_no_import_circle() -> None:
    assert find_cycles(import_graph()) == []


def test_no_layer_imports_a_higher_one() -> None:
    assert upward_imports(import_graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks can fail: a circle through a function-level import, and engine -> serve."""
    for folder in (tmp_path / "engine", tmp_path / "serve"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "serve" / "app.py").write_text("")
    (tmp_path / "engine" / "a.py").write_text("from ctscan.engine.b import f\n")
    (tmp_path / "engine" / "b.py").write_text(
        "def f():\n    from ctscan.engine import a\n    from ctscan.serve.app import x\n"
    )
    graph = import_graph(tmp_path)
    assert graph["ctscan.engine.b"] == {"ctscan.engine.a", "ctscan.serve.app"}
    assert find_cycles(graph) == [["ctscan.engine.a", "ctscan.engine.b", "ctscan.engine.a"]]
    assert upward_imports(graph) == ["ctscan.engine.b -> ctscan.serve.app"]
