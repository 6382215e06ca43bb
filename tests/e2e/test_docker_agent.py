"""bin/nanogrid-supervisor on the Docker runner: warm containers end to end, and no container
outlives a killed worker or the agent."""

from __future__ import annotations

import os
import signal
from typing import Any

import docker
import pytest
from helpers import wait_until
from supervised import ROOT, Agent

HELLO = ROOT / "examples" / "hello-python"

pytestmark = pytest.mark.usefixtures("pids_limited_tests")


def containers(engine: docker.DockerClient, agent: Agent) -> list[str]:
    """Ids of this agent's containers (their host directories lie under its socket_dir), from
    one listing: no inspect per container, which races removals by other agents on the host."""
    return [
        c["Id"]
        for c in engine.api.containers(all=True, filters={"label": "nanogrid.agent"})
        if c["Labels"].get("nanogrid.dir", "").startswith(str(agent.base))
    ]


def test_docker_agent_runs_warm_and_leaves_no_container(
    agents: Any, docker_engine: docker.DockerClient, runtime_image: str
) -> None:
    agent: Agent = agents(
        workers=1,
        runner="docker",
        runtimes={"python": {"image": runtime_image, "warm": 2}},
    )
    agent.write_config(docker={"socket_dir": str(agent.base / "sandboxes")})
    agent.start()
    wait_until(lambda: agent.status()["warmUp"]["state"] == "warm", timeout=60,
               what="the generic containers")  # a first call before them would be cold
    hello = agent.deploy(HELLO)
    first = agent.run(hello)
    second = agent.run(hello)
    assert first["status"] == second["status"] == "SUCCESS", first
    assert second["stdout"] == "Hello from NanoGrid!\n" and second["coldStart"] is False
    assert second["peakMemoryMB"] < 32 and second["durationMillis"] < 200
    wait_until(
        lambda: len(containers(docker_engine, agent)) == 3,
        timeout=20,
        what="2 generic containers and the one that holds hello",
    )
    wait_until(
        lambda: (p := agent.status()["pools"]["python"])["idleGeneric"] == 2
        and p["idleSpecialized"] == 1,
        timeout=10,
        what="/status saying so",
    )

    (victim,) = agent.alive().values()
    before = set(containers(docker_engine, agent))
    os.kill(victim, signal.SIGKILL)
    agent.wait_for_workers(1, without={victim}, timeout=20)
    wait_until(
        lambda: not before & set(containers(docker_engine, agent)),
        timeout=20,
        what="the killed worker's containers to be removed",
    )
    assert agent.run(hello)["status"] == "SUCCESS"

    agent.signal(signal.SIGTERM)
    assert agent.process is not None and agent.process.wait(timeout=30) == 0
    assert containers(docker_engine, agent) == []
    assert agent.leftovers() == []
