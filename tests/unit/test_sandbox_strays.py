"""What a process-runner run left behind is killed until it is gone (SandboxCgroup.kill_all),
as on the Docker side (test_container_strays.py): a killed process stays in the sandbox's
cgroup until it is scheduled to exit, which on a loaded host may take longer than a few
rounds of kills; one that never goes spoils the sandbox instead of staying in a kept one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nanogrid.runners import cgroups
from nanogrid.runners.cgroups import SandboxCgroup
from nanogrid.runners.memory import CgroupV1Memory

SERVER = 2


class LingeringCgroup(SandboxCgroup):
    """A sandbox cgroup whose leftover ``pid`` is still listed for ``listed_s`` after the
    first kill (None: for ever), beside its server."""

    def __init__(self, pid: int, listed_s: float | None) -> None:
        nowhere = Path("/nonexistent")
        super().__init__(nowhere, nowhere, CgroupV1Memory(nowhere))
        self.pid, self.listed_s = pid, listed_s
        self.first_listed: float | None = None

    def pids(self) -> list[int]:
        now = time.monotonic()
        self.first_listed = self.first_listed or now
        gone = self.listed_s is not None and now - self.first_listed >= self.listed_s
        return [SERVER] if gone else [SERVER, self.pid]


def test_a_leftover_slow_to_die_is_waited_for_and_the_sandbox_kept(leftover: int) -> None:
    assert LingeringCgroup(leftover, listed_s=0.1).kill_all(spare=SERVER) is True


def test_leftovers_that_never_go_spoil_the_sandbox_after_the_wait(
    leftover: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cgroups, "KILL_WAIT_S", 0.2)
    started = time.monotonic()
    assert LingeringCgroup(leftover, listed_s=None).kill_all(spare=SERVER) is False
    assert 0.2 <= time.monotonic() - started < 2


def counted(tmp_path: Path, tasks: object) -> SandboxCgroup:
    """A sandbox cgroup whose pids controller counts ``tasks`` (``pids.current``)."""
    (tmp_path / "pids.current").write_text(f"{tasks}\n")
    return SandboxCgroup(tmp_path, tmp_path, CgroupV1Memory(tmp_path))


def test_a_pid_1_that_cannot_reap_is_found_holding_an_unreaped_process(tmp_path: Path) -> None:
    """A node server, PID 1 of its sandbox, reaps only its own children: an orphan of a run
    stays counted by the pids controller (a zombie) after the kill, and the sandbox is not
    kept; its threads alone are."""
    threads = len(list(Path("/proc/self/task").iterdir()))
    assert counted(tmp_path, threads).holds_only(os.getpid()) is True
    assert counted(tmp_path, threads + 1).holds_only(os.getpid()) is False
    assert counted(tmp_path, "garbage").holds_only(os.getpid()) is False
