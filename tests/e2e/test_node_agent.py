"""bin/nanogrid-supervisor with python and node: node runs warm, and a runtime that cannot
start is named at start and in /status while the others keep working."""

from __future__ import annotations

import urllib.request
from typing import Any

from helpers import wait_until
from supervised import ROOT, Agent

HELLO_NODE = ROOT / "examples" / "hello-node"
HELLO_PYTHON = ROOT / "examples" / "hello-python"


def test_node_and_python_agent(agents: Any) -> None:
    agent: Agent = agents(workers=1, runtimes={"python": {"warm": 1}, "node": {"warm": 1}})
    agent.start()
    key = agent.deploy(HELLO_NODE)
    # The first call may beat the pool's warm-up (a cold start the pool does not keep).
    results = [agent.call(agent.task(key, runtime="node")) for _ in range(3)]
    assert [r["status"] for r in results] == ["SUCCESS"] * 3, results[0]
    assert results[2]["stdout"] == "Hello from NanoGrid!\n" and results[2]["coldStart"] is False
    assert agent.run(agent.deploy(HELLO_PYTHON))["status"] == "SUCCESS"
    status = agent.status()
    assert status["runtimes"] == {
        "python": {"available": True, "problem": None},
        "node": {"available": True, "problem": None},
    }
    wait_until(
        lambda: set(agent.status()["pools"]) == {"python", "node"},
        timeout=10,
        what="both runtimes' pools in /status",
    )


def test_a_runtime_that_cannot_start_is_named_at_start_and_in_status(agents: Any) -> None:
    runtimes = {"python": {"warm": 1}, "node": {"command": ["nanogrid-no-node", "main.js"]}}
    agent: Agent = agents(workers=1, runtimes=runtimes)
    agent.start()
    problem = "runtime command 'nanogrid-no-node' not found on PATH /usr/local/bin:/usr/bin:/bin"
    lines = [
        line for line in agent.log.read_text().splitlines() if "cannot start on this host" in line
    ]
    assert len(lines) == 1 and "arbiter" in lines[0]
    assert lines[0].endswith(f"runtime 'node' cannot start on this host: {problem}")
    assert agent.status()["runtimes"]["node"] == {"available": False, "problem": problem}
    result = agent.call(agent.task(agent.deploy(HELLO_NODE), runtime="node"))
    assert (result["status"], result["errorType"]) == ("FAILED", "RUNTIME_NOT_SUPPORTED")
    assert "'node' cannot start on this host" in result["errorMessage"]
    assert agent.run(agent.deploy(HELLO_PYTHON))["status"] == "SUCCESS"


IDLE_S = 4
"""Long enough that a loaded host's /status shows the sandbox back on the board (a snapshot
may be a second old) before its keeper shrinks it again."""


def test_an_idle_node_sandbox_ends_its_worker_and_serves_its_next_call(agents: Any) -> None:
    agent: Agent = agents(workers=2, runtimes={"python": {"warm": 1}, "node": {"warm": 1}},
                          pool={"node_worker_idle_seconds": IDLE_S})
    agent.start()
    key = agent.deploy(HELLO_NODE)
    assert agent.call(agent.task(key, runtime="node"))["status"] == "SUCCESS"
    wait_until(lambda: agent.status()["pools"]["node"]["shrunk"] == 1, timeout=IDLE_S + 13,
               what="the idle node sandbox to end its Worker")
    assert agent.status()["sandboxes"]["shrunk"] == 1
    url = f"http://127.0.0.1:{agent.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert 'nanogrid_sandboxes_shrunk{runtime="node"} 1' in reply.read().decode()
    result = agent.call(agent.task(key, runtime="node"))
    assert (result["status"], result["coldStart"]) == ("SUCCESS", False), result
    assert result["stdout"] == "Hello from NanoGrid!\n"
    # A snapshot from before the call took the sandbox shows it idle and shrunk still: wait
    # for one that counts the call done (the arbiter read its end) with the sandbox back.
    seen: list[dict[str, Any]] = []
    wait_until(lambda: seen.append(agent.status()) or (
        sum(w["tasksDone"] for w in seen[-1]["workers"]) == 2
        and seen[-1]["pools"]["node"]["idleSpecialized"] == 1),
        timeout=10, what="the call counted and its sandbox back on the board")
    assert seen[-1]["pools"]["node"]["shrunk"] == 0  # its call armed a Worker again
