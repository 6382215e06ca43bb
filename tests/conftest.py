"""Shared fixtures: real peers (redis-server, moto_server, dockerd), started once per session.

A missing peer fails the tests that need it, never skips them: CI must not hide a missing
install step. `dev/setup` installs and starts everything.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from helpers import (
    NODE_IMAGE,
    PEER_PIDS,
    RUNTIME_IMAGE,
    MotoServer,
    PeerProcess,
    RedisServer,
)
from pidscgroup import CgroupError, PidsCgroup

TESTS_PIDS_MAX = 2048
DOCKER_FIXTURES = {"docker_engine", "runtime_image", "node_image"}
E2E_DIR = Path(__file__).parent / "e2e"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml): twice this host's CPUs, at most 8. A test spends most of
    its time waiting for its agent and peers, so two per CPU keep the CPUs busy; a module's
    tests stay in one process (``--dist loadfile``), sharing its fixtures."""
    return min(8, 2 * len(os.sched_getaffinity(0)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs the Docker engine and the runtime image")
    config.addinivalue_line("markers", "e2e: starts bin/nanogrid-supervisor as a real process")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark by what a test uses, so `-m "not docker"` / `-m "not e2e"` cannot miss one.
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if DOCKER_FIXTURES & set(getattr(item, "fixturenames", ())) or "docker" in [
            value for value in params.values() if isinstance(value, str)
        ]:  # a runner fixture parametrized by runner name reaches the engine at run time
            item.add_marker(pytest.mark.docker)
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def _start_or_fail(server: PeerProcess) -> None:
    # pytest.fail outside the except block: one line, not a chain of tracebacks.
    error = None
    try:
        server.start()
    except (OSError, TimeoutError, RuntimeError) as exc:
        error = exc
    if error is not None:
        pytest.fail(f"{server.name} did not start ({error}): run dev/setup", pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """redis-server on a free port; `.stop()` / `.start()` simulate an outage and recovery."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    _start_or_fail(server)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty database on the session's redis-server (restarted if a test stopped it)."""
    redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto_server for SQS, S3 and CloudWatch, with the AWS_* environment pointing at it."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    _start_or_fail(server)
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                env.delenv(name, raising=False)
            for name, value in server.environ().items():
                env.setenv(name, value)
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A Docker client whose engine answered a ping."""
    client = None
    with contextlib.suppress(Exception):  # whatever the reason, the remedy is the same
        candidate = docker.from_env(timeout=60)
        candidate.ping()
        client = candidate
    if client is None:
        pytest.fail("Docker engine not reachable: run dev/setup", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def runtime_image(docker_engine: docker.DockerClient) -> str:
    """Tag of the local python runtime image built by bin/nanogrid-build-images."""
    if not docker_engine.images.list(name=RUNTIME_IMAGE):
        pytest.fail(f"Docker image {RUNTIME_IMAGE} missing: run dev/setup", pytrace=False)
    return RUNTIME_IMAGE


@pytest.fixture(scope="session")
def node_image(docker_engine: docker.DockerClient) -> str:
    """Tag of the local node runtime image (node only, no python3) built by
    bin/nanogrid-build-images."""
    if not docker_engine.images.list(name=NODE_IMAGE):
        pytest.fail(f"Docker image {NODE_IMAGE} missing: run dev/setup", pytrace=False)
    return NODE_IMAGE


@pytest.fixture(scope="session")
def pids_limited_tests() -> Iterator[int]:
    """Confine this pytest process and all it starts from now on to pids.max processes, so
    a hostile-code test cannot take the machine down. Yields the limit."""
    cgroup = PidsCgroup(TESTS_PIDS_MAX)
    error = None
    try:
        cgroup.enter()
    except CgroupError as exc:
        error = exc
    if error is not None:
        pytest.fail(f"cannot confine the tests to a pids cgroup: {error}", pytrace=False)
    yield cgroup.limit
    leftovers = cgroup.leave(spare=PEER_PIDS)
    if leftovers:
        warnings.warn(f"killed {len(leftovers)} process(es) left in {cgroup.path}", stacklevel=1)
