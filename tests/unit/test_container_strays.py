"""What a Docker run left behind is killed until it is gone (ContainerProcesses.kill_strays):
a killed process stays in the container's cgroup until it is scheduled to exit, which on a
loaded host may take longer than a few rounds of kills."""

from __future__ import annotations

import time

import pytest

from nanogrid.runners import cgroups
from nanogrid.runners.docker.cgroup import ContainerProcesses


class LingeringStrays(ContainerProcesses):
    """A container whose leftover ``pid`` is still listed for ``listed_s`` after the first
    kill (None: for ever)."""

    def __init__(self, pid: int, listed_s: float | None) -> None:
        super().__init__(init_pid=1, server_pid=2, procs_file=None)
        self.pid, self.listed_s = pid, listed_s
        self.first_listed: float | None = None

    def strays(self) -> list[int]:
        now = time.monotonic()
        self.first_listed = self.first_listed or now
        gone = self.listed_s is not None and now - self.first_listed >= self.listed_s
        return [] if gone else [self.pid]


def test_a_leftover_slow_to_die_is_waited_for_and_the_sandbox_kept(leftover: int) -> None:
    strays = LingeringStrays(leftover, listed_s=0.1)  # 20 rounds of 1 ms were too few
    assert strays.kill_strays() is True


def test_leftovers_that_never_go_spoil_the_sandbox_after_the_wait(
    leftover: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cgroups, "KILL_WAIT_S", 0.2)
    strays = LingeringStrays(leftover, listed_s=None)
    started = time.monotonic()
    assert strays.kill_strays() is False
    assert 0.2 <= time.monotonic() - started < 2
