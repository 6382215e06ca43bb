"""The cgroup freezer that stops idle sandboxes (nanogrid/runners/freezer.py), on each cgroup
version this host mounts: v1's freezer hierarchy and a v2 tree (the unified one of a hybrid
host)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cgroup_frozen, cpu_seconds, wait_until

from nanogrid.runners.freezer import Freezer

ROOT = Path("/sys/fs/cgroup")


def hierarchies() -> dict[str, tuple[Path, bool]]:
    """The freezers this host has: name -> (the hierarchy's root, v2)."""
    found = {}
    if (ROOT / "freezer" / "cgroup.procs").exists():
        found["v1"] = (ROOT / "freezer", False)
    for root in (ROOT, ROOT / "unified"):  # a v2 host's, or a hybrid host's unified tree
        if (root / "cgroup.controllers").exists():
            found.setdefault("v2", (root, True))
    return found


HIERARCHIES = hierarchies()

pytestmark = pytest.mark.usefixtures("pids_limited_tests")


@pytest.fixture(params=sorted(HIERARCHIES))
def spinning(request: pytest.FixtureRequest) -> Iterator[tuple[Freezer, subprocess.Popen]]:
    """A process that spins, alone in a new cgroup of the hierarchy, and that cgroup's freezer."""
    root, v2 = HIERARCHIES[request.param]
    directory = root / f"nanogrid-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    freezer = Freezer(directory, v2)
    try:
        (directory / "cgroup.procs").write_text(str(process.pid))
        yield freezer, process
    finally:
        process.kill()
        freezer.thaw()
        process.wait()
        freezer.close()
        directory.rmdir()


def used(pid: int, seconds: float) -> float:
    before = cpu_seconds([pid])
    time.sleep(seconds)
    return cpu_seconds([pid]) - before


def runs(pid: int) -> bool:
    """The process gets 0.1 s of CPU within 10 s (on a loaded host it may wait for a core)."""
    before = cpu_seconds([pid])
    return bool(wait_until(lambda: cpu_seconds([pid]) - before > 0.1, timeout=10,
                           what=f"process {pid} to run"))


def test_a_frozen_cgroup_runs_nothing_until_it_is_thawed(
    spinning: tuple[Freezer, subprocess.Popen],
) -> None:
    freezer, process = spinning
    assert freezer.exists() and freezer.pids() == [process.pid]
    assert runs(process.pid)
    freezer.freeze()
    wait_until(lambda: cgroup_frozen(freezer.directory), timeout=2, what="the cgroup to be frozen")
    assert used(process.pid, 0.5) == 0
    freezer.thaw()
    assert not cgroup_frozen(freezer.directory)
    assert runs(process.pid)


def test_a_process_killed_while_frozen_ends_once_thawed(
    spinning: tuple[Freezer, subprocess.Popen],
) -> None:
    """What SandboxCgroup.kill_frozen and ContainerProcesses.kill_frozen rely on: SIGKILL,
    then thaw, and the process ends without running again."""
    freezer, process = spinning
    freezer.freeze()
    wait_until(lambda: cgroup_frozen(freezer.directory), timeout=2, what="the cgroup to be frozen")
    os.kill(process.pid, signal.SIGKILL)
    freezer.thaw()
    assert process.wait(timeout=5) == -signal.SIGKILL
