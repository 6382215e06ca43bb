"""The packages' imports flow one way: devtools -> supervisor -> worker -> runners -> common,
and no module imports itself back through another (no cycles, TYPE_CHECKING ones included).
The fork server, run on its own in every sandbox, imports nothing but the stdlib and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("common", "runners", "worker", "supervisor", "devtools")
"""Each package may import only the ones before it (and itself)."""


def imports_of(path: Path) -> set[str]:
    """Dotted modules of this project that ``path`` imports, anywhere in the file."""
    package = path.parent.name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else ""
                module = f"{base}.{node.module}" if node.module else base
                found.update(
                    [module] if node.module else [f"{base}.{alias.name}" for alias in node.names]
                )
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    modules = {f"{p.parent.name}.{p.stem}" for pkg in ORDER for p in (ROOT / pkg).glob("*.py")}
    return {name for name in found if name in modules or name in ORDER}


def graph() -> dict[str, set[str]]:
    return {
        f"{path.parent.name}.{path.stem}": imports_of(path)
        for package in ORDER
        for path in sorted((ROOT / package).glob("*.py"))
    }


def test_the_graph_sees_the_imports() -> None:
    edges = graph()
    assert {"worker.result", "runners", "common.config"} <= edges["worker.loop"]
    assert "runners.base" in edges["runners.pool"]


def test_packages_import_only_the_ones_below_them() -> None:
    wrong = []
    for module, imported in graph().items():
        rank = ORDER.index(module.split(".")[0])
        for name in imported:
            if ORDER.index(name.split(".")[0]) > rank:
                wrong.append(f"{module} imports {name}")
    assert wrong == []


def test_no_import_cycles() -> None:
    edges = {m: {i for i in imported if i != m and not i.endswith(".__init__")}
             for m, imported in graph().items()}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in edges.get(module, ()):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif len(path) < 20:
                visit(nxt, [*path, nxt])

    for module in edges:
        visit(module, [module])
    assert cycles == []


def test_the_fork_server_imports_only_the_stdlib_and_itself() -> None:
    """It runs on its own in every sandbox (``python3 -I -S runners/forkserver``): an import
    of the agent's packages, or of anything installed, works in the tests but not there."""
    wrong = []
    for path in sorted((ROOT / "runners" / "forkserver").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            top = [name.split(".")[0] for name in names]
            wrong += [f"{path.name} imports {n}" for n in top if n not in sys.stdlib_module_names]
    assert wrong == []
