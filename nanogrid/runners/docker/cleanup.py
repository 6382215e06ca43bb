"""Finding and removing the agent's containers by label: those of workers that are gone (an
earlier agent's leftovers at start, this agent's after a drain), never a live worker's."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException, NotFound
from loguru import logger
from requests.exceptions import RequestException

DOCKER_TIMEOUT_S = 30
AGENT_LABEL = "nanogrid.agent"
WORKER_LABEL = "nanogrid.worker"
RUNTIME_LABEL = "nanogrid.runtime"
PID_LABEL = "nanogrid.pid"
"""The worker process that owns the container: a new worker removes the dead ones' leftovers."""
DIR_LABEL = "nanogrid.dir"
"""The container's host directory, removed with it (also by an agent that did not make it)."""
UNREACHABLE = (DockerException, RequestException)
"""What the Docker SDK raises when the engine is gone, refuses, or times out."""



def agent_id() -> str:
    """This agent's label value: stable per host, so a restarted agent finds its leftovers."""
    return socket.gethostname()


def labels(worker: int, runtime: str, root: Path) -> dict[str, str]:
    """The labels a sandbox's container is made with, by which it is found again."""
    return {
        AGENT_LABEL: agent_id(),
        WORKER_LABEL: str(worker),
        RUNTIME_LABEL: runtime,
        PID_LABEL: str(os.getpid()),
        DIR_LABEL: str(root),
    }


def describe(exc: BaseException) -> str:
    """One line for people from a Docker SDK error."""
    if isinstance(exc, RequestException):
        return f"Docker engine unreachable ({type(exc).__name__})"
    explanation = getattr(exc, "explanation", None)
    text = str(explanation or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _pid_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_listed(api: docker.DockerClient, listed: list[dict[str, Any]]) -> int:
    """Force-remove containers (as listed by the engine) and their host directories."""
    for entry in listed:
        with contextlib.suppress(NotFound):
            api.api.remove_container(entry["Id"], force=True)
        directory = Path(entry["Labels"].get(DIR_LABEL, ""))
        names = [n.lstrip("/") for n in entry.get("Names") or []]
        if directory.is_absolute() and directory.name in names:  # never rmtree a stray label
            shutil.rmtree(directory, ignore_errors=True)
    return len(listed)


def remove_orphans(api: docker.DockerClient) -> int:
    """Remove this host's agent containers whose worker process is gone."""
    found = api.api.containers(all=True, filters={"label": f"{AGENT_LABEL}={agent_id()}"})
    return _remove_listed(api, [c for c in found if not _pid_alive(c["Labels"].get(PID_LABEL, ""))])


def remove_agent_containers() -> int:
    """Remove the containers of exited workers of this host's agent (at agent start and stop).

    At start they are an earlier agent's leftovers; after a drain, the workers are gone. A
    live worker's containers (another agent or test run on the host) are left alone.
    """
    try:
        api = docker.from_env(timeout=DOCKER_TIMEOUT_S)
    except UNREACHABLE as exc:
        logger.warning(f"[DOCKER] cannot look for leftover containers: {describe(exc)}")
        return 0
    try:
        return remove_orphans(api)
    except UNREACHABLE as exc:
        logger.warning(f"[DOCKER] cannot remove leftover containers: {describe(exc)}")
        return 0
    finally:
        api.close()
