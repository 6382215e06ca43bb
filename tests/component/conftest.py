"""Fixtures of the component tier (the peers themselves are in tests/conftest.py): a worker
process on the real peers, and the containers of one test."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from harness import SCRATCH, Agent, agent_containers

from nanogrid.runners.docker import cleanup as container_cleanup


@pytest.fixture
def agent(aws: Any, redis_url: str, tmp_path: Path) -> Iterator[Agent]:
    """A worker process on a fresh queue, bucket and Redis database; it must drain to 0."""
    running = Agent(aws, redis_url, tmp_path).start()
    yield running
    assert running.stop() == 0


@pytest.fixture
def containers_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh agent id for this test's containers (forked children inherit it), so the
    agent-wide cleanup tested never touches anything else on the engine; the test's scratch
    directories are removed after it."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setattr(container_cleanup, "agent_id", lambda: name)
    yield name
    while SCRATCH:
        shutil.rmtree(SCRATCH.pop(), ignore_errors=True)


@pytest.fixture
def engine(
    docker_engine: docker.DockerClient, runtime_image: str, containers_agent: str
) -> Iterator[docker.DockerClient]:
    """The engine; on teardown no container of this test's agent may be left."""
    yield docker_engine
    left = agent_containers(docker_engine, containers_agent)
    for container in left:
        container.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"
