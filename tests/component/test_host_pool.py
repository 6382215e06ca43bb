"""The host's warm pool with real workers (nanogrid/worker/loop.py processes on one HostShare), real
process sandboxes, SQS, S3 and Redis: a call runs warm whichever worker takes it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HELLO, Agent, fork_worker, stop
from helpers import wait_until

from nanogrid.common import capacity
from nanogrid.runners.lending import IDLE, TAKEN, Entry
from nanogrid.worker.hostshare import HostShare

pytestmark = pytest.mark.usefixtures("pids_limited_tests")

SLEEPER = (
    "import json, sys, time\n"
    "time.sleep(json.load(sys.stdin).get('sleep', 0))\n"
    "print('slept')\n"
)


def host_agent(aws: Any, redis_url: str, tmp: Path, **overrides: Any) -> Agent:
    """Worker 0 of a two-worker host, on pages the test holds (HostShare) so that another
    worker can share them; not started."""
    agent = Agent(aws, redis_url, tmp, workers=2, **overrides)
    agent.config = capacity.pin(agent.config, capacity.resolve(agent.config))
    agent.host = HostShare.create(agent.config)
    return agent


@pytest.fixture
def pair(aws: Any, redis_url: str, tmp_path: Path) -> Iterator[tuple[Agent, Any]]:
    """Worker 0 (``Agent``) and worker 1 (a forked process) on one host, each with one
    generic python sandbox of its own (``warm: 2`` split)."""
    agent = host_agent(aws, redis_url, tmp_path, runtimes={"python": {"warm": 2}}).start()
    second = fork_worker(agent.config, 1, agent.host)
    try:
        wait_until(lambda: agent.log.read_text().count(" ready (pid ") == 2, timeout=20,
                   what="two workers")
        wait_until(lambda: len(generic(agent)) == 2, timeout=20, what="two generic sandboxes")
        yield agent, second
    finally:
        for pid in (agent.process.pid, second.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        stop(second)
        agent.stop()


def board(agent: Agent) -> list[Entry]:
    assert agent.host is not None
    return agent.host.board.entries()


def generic(agent: Agent) -> list[Entry]:
    return [e for e in board(agent) if e.state == IDLE and e.code_key is None]


def specialized(agent: Agent) -> list[Entry]:
    """The sandboxes that hold a function's code."""
    return [e for e in board(agent) if e.code_key]


def settled_call(agent: Agent, task: dict[str, Any]) -> dict[str, Any]:
    """The call's result, once its sandbox is back on the board: after a function's first
    run the sandbox settles (its server preloads) after the result is out."""
    result = agent.call(task)
    wait_until(lambda: not [e for e in board(agent) if e.state == TAKEN], timeout=10,
               what="the call's sandbox back on the board")
    return result


def test_a_call_runs_warm_in_the_sandbox_another_worker_made(pair: tuple[Agent, Any]) -> None:
    agent, second = pair
    key = agent.deploy({"main.py": SLEEPER})
    os.kill(second.pid, signal.SIGSTOP)  # only worker 0 takes calls
    first = settled_call(agent, agent.task(key))
    assert first["status"] == "SUCCESS"
    [made] = specialized(agent)
    assert made.owner == 0
    os.kill(second.pid, signal.SIGCONT)
    os.kill(agent.process.pid, signal.SIGSTOP)  # only worker 1 takes calls now
    request = agent.send(agent.task(key, inputData={"sleep": 1}))
    running = wait_until(
        lambda: [e for e in specialized(agent) if e.state == TAKEN], timeout=10,
        what="worker 1's call in worker 0's sandbox",
    )
    assert running[0].index == made.index and running[0].taker_pid == second.pid
    result = agent.result(request)
    assert result["status"] == "SUCCESS" and result["coldStart"] is False
    assert [e.index for e in specialized(agent)] == [made.index]  # none made for it
    os.kill(agent.process.pid, signal.SIGCONT)


def test_a_new_functions_first_call_takes_a_generic_sandbox(pair: tuple[Agent, Any]) -> None:
    agent, _ = pair
    before = {e.index for e in generic(agent)}
    result = settled_call(agent, agent.task(agent.deploy({"main.py": HELLO})))
    assert result["status"] == "SUCCESS" and result["coldStart"] is False
    [given] = specialized(agent)
    assert given.index in before
    # Its place is refilled off the call's path: the host has its two generic ones again.
    wait_until(lambda: len(generic(agent)) == 2, timeout=10, what="the generic one refilled")


def test_a_call_in_a_lent_sandbox_whose_owner_dies_runs_again_and_never_fails(
    pair: tuple[Agent, Any],
) -> None:
    agent, second = pair
    key = agent.deploy({"main.py": SLEEPER})
    os.kill(second.pid, signal.SIGSTOP)
    assert settled_call(agent, agent.task(key))["status"] == "SUCCESS"  # worker 0's holds it
    [made] = specialized(agent)
    os.kill(second.pid, signal.SIGCONT)
    os.kill(agent.process.pid, signal.SIGSTOP)
    request = agent.send(agent.task(key, inputData={"sleep": 3}))
    wait_until(lambda: [e for e in specialized(agent) if e.state == TAKEN and
                        e.index == made.index], timeout=10, what="the lent run")
    time.sleep(0.3)  # the function sleeps now
    agent.process.kill()  # the owner, and with it its sandboxes
    agent.process.join(10)
    result = agent.result(request, timeout=30)
    assert result["status"] == "SUCCESS" and result["attempt"] == 2, result
    log = agent.log.read_text()
    assert re.search(rf"{request} .* died during the run .*: run 1 counted", log)
    assert re.search(rf"worker-1 +\| {request} .* running fn in python-w1-", log)
    wait_until(lambda: agent.queue_depth() == 0, timeout=15, what="every message deleted")
    assert agent.dead_letters() == []


def test_the_hosts_idle_bound_dooms_the_least_recently_used(
    aws: Any, redis_url: str, tmp_path: Path
) -> None:
    agent = host_agent(aws, redis_url, tmp_path, runtimes={"python": {"warm": 2}},
                       pool={"max_idle": 4}).start()
    second = fork_worker(agent.config, 1, agent.host)
    try:
        wait_until(lambda: len(generic(agent)) == 2, timeout=20, what="two generic sandboxes")
        held: list[str] = []  # code keys, in the order their functions were called
        for i in range(5):
            # Each call finds a generic sandbox (one that waited would make the pools keep
            # more generic ones for a while: pool.py's _generic_target).
            wait_until(lambda: len(generic(agent)) == 2, timeout=10, what="the generic ones")
            key = agent.deploy({"main.py": f"print({i})\n"})
            assert settled_call(agent, agent.task(key))["status"] == "SUCCESS"
            held += [e.code_key for e in specialized(agent) if e.code_key not in held]

        def settled() -> list[Entry] | None:
            idle = [e for e in board(agent) if e.state == IDLE]
            return idle if len(idle) <= 4 and len(generic(agent)) == 2 else None

        idle = wait_until(settled, timeout=15, what="the idle sandboxes within the bound")
        assert len(held) == 5
        assert sorted(e.code_key for e in idle if e.code_key) == sorted(held[-2:])
    finally:
        stop(second)
        agent.stop()
