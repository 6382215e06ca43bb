"""Stopping the real arbiter (fake workers): drain, drain timeout, no process left behind."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_agent import FakeAgent, gone
from helpers import wait_until


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    with FakeAgent(tmp_path) as running:
        yield running


def spawned(agent: FakeAgent) -> set[int]:
    return {pid for _, _, pid, _ in agent.events("spawn")}


def test_sigterm_lets_in_flight_runs_finish_then_exits_0(agent: FakeAgent) -> None:
    agent.behave("busy")  # each worker runs a 1 s task that SIGTERM does not cut short
    agent.start()
    wait_until(lambda: [w["currentRequestId"] is not None for w in agent.status()["workers"]]
               == [True, True], timeout=5)  # both spawned, and running their task
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout=3 + 1) == 0
    assert {i for e, i, _, _ in agent.events() if e == "finished"} == {0, 1}
    assert all(gone(pid) for pid in spawned(agent))
    assert [e for e, *_ in agent.events() if e == "cleanup"] == ["cleanup", "cleanup"]
    log = agent.log.read_text()
    assert "received SIGTERM" in log and "SIGKILL" not in log and "stopped" in log


def test_workers_still_running_at_the_drain_timeout_are_killed(agent: FakeAgent) -> None:
    agent.write_config(drain_timeout_seconds=1)
    agent.behave("stubborn")
    agent.start()
    agent.wait_for_workers(2)
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    # Stubborn workers never exit on their own: the exit alone proves the kill. The bound is
    # the 1 s drain, then the kill, with slack for a loaded host.
    assert agent.wait(timeout=6) == 0
    assert 1.0 <= time.monotonic() - started < 4.0
    assert all(gone(pid) for pid in spawned(agent))
    agent.wait_for_log(r"did not exit in time; sending SIGKILL")


def test_second_sigint_kills_what_is_still_draining(agent: FakeAgent) -> None:
    agent.write_config(drain_timeout_seconds=60)
    agent.behave("stubborn")
    agent.start()
    agent.wait_for_workers(2)
    agent.signal(signal.SIGINT)
    agent.wait_for_log("stopping: draining 2 workers")
    agent.signal(signal.SIGINT)
    assert agent.wait(timeout=3) == 0
    assert all(gone(pid) for pid in spawned(agent))


def test_workers_exit_when_the_arbiter_is_killed(agent: FakeAgent) -> None:
    agent.start()
    pids = agent.wait_for_workers(2)
    agent.signal(signal.SIGKILL)
    agent.wait(timeout=5)
    wait_until(lambda: all(gone(pid) for pid in pids), timeout=3, what="orphaned workers to exit")
