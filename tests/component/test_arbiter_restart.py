"""Crash handling of the real arbiter (fake workers): replacement, backoff, heartbeat murder."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_agent import FakeAgent
from helpers import wait_until


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    with FakeAgent(tmp_path) as running:
        yield running


def spawn_times(agent: FakeAgent, index: int = 0) -> list[float]:
    return [t for _, i, _, t in agent.events("spawn") if i == index]


def test_killed_worker_is_replaced_in_its_slot_within_2s(agent: FakeAgent) -> None:
    agent.start()
    before = agent.wait_for_workers(2)
    victim = max(before)
    slot = next(w["id"] for w in agent.status()["workers"] if w["pid"] == victim)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    after = wait_until(lambda: len(p := agent.running_pids() - {victim}) == 2 and p, timeout=5)
    assert time.monotonic() - killed_at < 2.0
    replacement = next(w for w in agent.status()["workers"] if w["id"] == slot)
    assert replacement["pid"] in after - before and replacement["restarts"] == 1
    agent.wait_for_log(rf"worker {slot} \(pid {victim}\) was killed by SIGKILL; replacing it")
    assert "nanogrid_worker_restarts_total 1" in agent.get("/metrics")[1]


def test_crash_loop_backs_off_instead_of_spinning(agent: FakeAgent) -> None:
    agent.write_config(workers=1)
    agent.behave("crash")
    agent.start()
    time.sleep(3.0)
    agent.behave("steady")
    times = spawn_times(agent)
    # Crashes in a row wait 0, 0.5, 1, 2 s: about four spawns in 3 s, not hundreds.
    assert 3 <= len(times) <= 5, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[1] >= 0.5
    wait_until(lambda: agent.running_pids(), timeout=5)
    agent.wait_for_log(r"exited with code 1; replacing it in 0\.5s \(restart 2\)")


def test_worker_that_cannot_boot_is_retried_with_backoff(agent: FakeAgent) -> None:
    agent.write_config(workers=1)
    agent.behave("bootfail")
    agent.start()
    wait_until(lambda: len(spawn_times(agent)) == 2, timeout=5)
    assert agent.get("/health")[0] == 503
    agent.behave("steady")  # Redis is back: the next retry, 2 s later, boots
    wait_until(lambda: agent.running_pids(), timeout=5)
    times = spawn_times(agent)
    assert len(times) == 3
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 1.95
    agent.wait_for_log(r"worker 0 could not boot \(exited with code 3 \(EXIT_BOOT_ERROR\)\); "
                       r"retry 1 in 1s")
    assert agent.get("/health")[0] == 200
    assert agent.status()["workers"][0]["restarts"] == 2


def test_worker_that_raises_is_reported_in_one_line_and_replaced(agent: FakeAgent) -> None:
    agent.write_config(workers=1)
    agent.behave("raise")
    agent.start()
    agent.wait_for_log(r"worker 0 crashed: RuntimeError: the fake worker broke")
    agent.behave("steady")
    agent.wait_for_log(r"exited with code 4 \(EXIT_WORKER_CRASH\)")
    wait_until(lambda: agent.running_pids(), timeout=5)
    assert "Traceback" not in agent.log.read_text()


def test_worker_that_stops_heartbeating_is_killed_and_replaced(agent: FakeAgent) -> None:
    agent.write_config(workers=1)
    agent.behave("hang")  # beats for 0.3 s, then hangs and ignores SIGTERM
    agent.start()
    (hung,) = wait_until(lambda: agent.running_pids(), timeout=5)
    agent.behave("steady")
    agent.wait_for_log(rf"worker 0 \(pid {hung}\) sent no heartbeat for 1s; stopping it")
    agent.wait_for_log(rf"worker 0 \(pid {hung}\) did not exit in time; sending SIGKILL")
    agent.wait_for_log(rf"worker 0 \(pid {hung}\) was killed by SIGKILL; replacing it in 0s")
    (replacement,) = wait_until(lambda: agent.running_pids() - {hung}, timeout=5)
    assert agent.status()["workers"][0] | {"pid": replacement, "restarts": 1} == \
        agent.status()["workers"][0]
