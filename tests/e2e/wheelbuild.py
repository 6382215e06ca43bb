"""The agent's wheel, as an operator builds it (docs/systemd.md), offline: setuptools and
the dependencies come from the wheelhouse dev/setup builds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = "/var/cache/nanogrid-wheels"
BUILD_LEFTOVERS = ("build", "dist", "*.egg-info", ".git", "__pycache__", ".*_cache")


class BuildError(Exception):
    """pip failed; the message is one line with its output's end."""


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pip ARGS`` of the tests' interpreter, offline from the wheelhouse."""
    cmd = [sys.executable, "-m", "pip", *args, "-q", "--no-index", "--find-links", WHEELHOUSE]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise BuildError(f"pip {' '.join(args)} exited {done.returncode}: {' | '.join(tail)} "
                         f"(is {WHEELHOUSE} complete? run dev/setup)")
    return done


def build_wheel(directory: Path) -> Path:
    """This checkout's wheel, in ``directory``. Built from a copy of the checkout: setuptools
    would reuse a build/ or egg-info left in it and ship what an earlier build found instead
    of what pyproject.toml says now."""
    source = directory / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    pip("wheel", "--no-deps", "-w", str(directory), ".", cwd=source)
    shutil.rmtree(source)
    [wheel] = directory.glob("nanogrid_worker-*.whl")
    return wheel
