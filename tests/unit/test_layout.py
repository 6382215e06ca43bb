"""The packages' imports flow one way: devtools -> admin -> supervisor -> worker -> runners
-> common, and no module imports itself back through another (no cycles, TYPE_CHECKING ones
included). The fork server and the node server, run on their own in every sandbox, import
nothing but their language's standard library and themselves."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("common", "runners", "worker", "supervisor", "admin", "devtools")
"""Each package may import only the ones before it (and itself)."""


def module_name(path: Path) -> str:
    """``nanogrid/runners/docker/runner.py`` -> ``nanogrid.runners.docker.runner`` (a package: its
    name)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    return sorted(path for package in ORDER for path in (ROOT / "nanogrid" / package).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Dotted modules of this project that ``path`` imports, anywhere in the file."""
    package = path.relative_to(ROOT).parent.parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                found.update(
                    [module] if node.module else [f"{base}.{alias.name}" for alias in node.names]
                )
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in sources()}
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sources()}


def test_the_graph_sees_the_imports() -> None:
    edges = graph()
    assert {"nanogrid.worker.pipeline", "nanogrid.common.config"} <= edges["nanogrid.worker.loop"]
    assert {"nanogrid.runners", "nanogrid.worker.claim"} <= edges["nanogrid.worker.services"]
    assert "nanogrid.runners.base" in edges["nanogrid.runners.pool"]
    assert {"nanogrid.runners.pooled", "nanogrid.runners.docker.spec"} <= edges[
        "nanogrid.runners.docker.runner"
    ]


def test_packages_import_only_the_ones_below_them() -> None:
    wrong = []
    for module, imported in graph().items():
        rank = ORDER.index(module.split(".")[1])
        for name in imported:
            if ORDER.index(name.split(".")[1]) > rank:
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
    """It runs on its own in every sandbox (``python3 -I -S nanogrid/runners/forkserver``): an
    import of the agent's packages, or of anything installed, works in the tests but not there."""
    wrong = []
    for path in sorted((ROOT / "nanogrid" / "runners" / "forkserver").glob("*.py")):
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


def test_the_node_server_requires_only_node_and_itself() -> None:
    """It runs on its own in every sandbox (``node nanogrid/runners/nodeserver``): a require of a
    package works only where one is installed. Its Workers run ``boot`` as source, where a
    relative require would resolve next to the function: ``boot`` requires node's only."""
    node = shutil.which("node")
    assert node is not None, "node is not installed: run dev/setup"
    builtins = set(json.loads(subprocess.run(
        [node, "-p", "JSON.stringify(require('module').builtinModules)"],
        capture_output=True, text=True, check=True,
    ).stdout))
    directory = ROOT / "nanogrid" / "runners" / "nodeserver"
    pattern = re.compile(r"require\('([^']*)'\)")
    wrong = []
    for path in sorted(directory.glob("*.js")):
        for name in pattern.findall(path.read_text()):
            sibling = name.startswith("./") and (directory / f"{name[2:]}.js").is_file()
            if name not in builtins and not sibling:
                wrong.append(f"{path.name} requires {name}")
    source = (directory / "worker.js").read_text()
    boot = source[source.index("function boot() {"):]
    boot = boot[: boot.index("\n}\n")]
    wrong += [f"boot requires {n}" for n in pattern.findall(boot) if n not in builtins]
    assert (directory / "index.js").is_file()  # what `node nanogrid/runners/nodeserver` runs
    assert wrong == []
