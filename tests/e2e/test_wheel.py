"""The agent as a wheel: built from this checkout and installed offline into a fresh venv
outside it (the wheelhouse dev/setup builds), then run from a directory outside it too, so
nothing of the checkout is on its path: `--version`, `--check`, and real tasks (python and
node, on the process runner) through the installed `nanogrid-supervisor`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import scratch_dir
from wheelbuild import BuildError, build_wheel, pip

ROOT = Path(__file__).resolve().parents[2]
OLD_TOP_LEVEL = ("common", "worker", "runners", "supervisor", "admin", "devtools")
HELLO_NODE = "console.log('Hello from the wheel on node')\n"


def _run(cmd: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}: {done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    """A venv with the wheel of this checkout installed, in a directory sandbox users can
    reach (their fork server runs from its site-packages)."""
    base = scratch_dir("nanogrid-wheel-")
    error = None
    try:
        env = base / "venv"
        try:
            wheel = build_wheel(base)
            _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=base)
            # The wheel by its path: the wheelhouse gives only its dependencies.
            pip("--python", str(env / "bin" / "python"), "install", str(wheel), cwd=base)
        except BuildError as exc:
            error = exc
        if error is not None:
            pytest.fail(str(error), pytrace=False)
        yield env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def site_packages(env: Path) -> Path:
    [found] = (env / "lib").glob("python3*/site-packages")
    return found


def installed_version(env: Path, cwd: Path) -> str:
    code = "import nanogrid; print(nanogrid.__version__)"
    return _run([str(env / "bin" / "python"), "-c", code], cwd=cwd).stdout.strip()


def test_only_the_nanogrid_package_is_installed(venv: Path) -> None:
    site = site_packages(venv)
    assert [name for name in OLD_TOP_LEVEL if (site / name).exists()] == []
    [dist] = site.glob("nanogrid_worker-*.dist-info")
    assert (dist / "top_level.txt").read_text().split() == ["nanogrid"]
    node_server = Path("nanogrid", "runners", "nodeserver")
    shipped = sorted(p.name for p in (ROOT / node_server).glob("*.js"))
    assert sorted(p.name for p in (site / node_server).glob("*.js")) == shipped
    code = "import nanogrid; print(nanogrid.__file__)"
    imported = _run([str(venv / "bin" / "python"), "-c", code], cwd=venv)
    assert imported.stdout.strip() == str(site / "nanogrid" / "__init__.py")


def test_the_installed_supervisor_tells_its_version_and_checks_a_config(
        venv: Path, tmp_path: Path) -> None:
    supervisor = str(venv / "bin" / "nanogrid-supervisor")
    version = installed_version(venv, tmp_path)
    shown = _run([supervisor, "--version"], cwd=tmp_path).stdout
    assert shown == f"nanogrid-supervisor {version} (nanogrid-worker)\n"
    config = tmp_path / "worker.yaml"
    config.write_text((ROOT / "conf" / "worker.yaml").read_text())
    checked = _run([supervisor, "--check"], cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "NANOGRID_CONFIG": str(config)})
    assert checked.stdout.startswith(f"nanogrid-supervisor: {config}: OK (")


def test_the_installed_agent_runs_python_and_node_tasks(venv: Path, agents: Any) -> None:
    agent = agents(workers=1, runtimes={"python": {"warm": 1}, "node": {"warm": 1}})
    agent.command = [str(venv / "bin" / "nanogrid-supervisor")]
    agent.start()
    assert agent.status()["version"] == installed_version(venv, agent.base)
    python = agent.run(agent.deploy("print('Hello from the wheel')\n"))
    assert (python["status"], python["stdout"]) == ("SUCCESS", "Hello from the wheel\n"), python
    node_key = agent.upload(_zip_node(agent.base / "hello-node"))
    node = agent.call(agent.task(node_key, runtime="node"), timeout=20)
    # its server's .js files come from the wheel: nothing of the checkout is on the agent's path
    assert (node["status"], node["stdout"]) == ("SUCCESS", "Hello from the wheel on node\n"), node


def _zip_node(directory: Path) -> bytes:
    from nanogrid.devtools.invoke import zip_function

    directory.mkdir()
    (directory / "main.js").write_text(HELLO_NODE)
    return zip_function(directory)
