"""A container sandbox, and how one comes up: its host directory, the container started,
its fork server found and its control directory sealed."""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import psutil
from docker.models.containers import Container

from nanogrid.common.errors import SandboxError

from ..launch import Launch
from ..serversandbox import ServerSandbox
from .cgroup import ContainerCgroup, ContainerProcesses, find_cgroup
from .cleanup import UNREACHABLE
from .reaper import Reaper

START_TIMEOUT_S = 20.0
"""How long a started container's fork server may take to listen."""


@dataclass(eq=False)
class DockerSandbox(ServerSandbox):
    root: Path = field(default_factory=Path)
    container: Container | None = None
    cgroup: ContainerCgroup | None = None
    processes: ContainerProcesses | None = None
    container_id: str = ""
    server_fd: int = -1
    """A pidfd of the fork server (its owner's): readable once it is gone (container killed,
    engine gone)."""
    paused: bool = False


class ServerDidNotStart(SandboxError):
    """The container's fork server never listened; ``log`` is the container's last line."""

    def __init__(self, what: str, log: str) -> None:
        super().__init__(f"{what}: {log}")
        self.log = log


def make_host_dir(sandbox: DockerSandbox, launch: Launch, uid: int, gid: int) -> None:
    """The sandbox's directory on the host: its code, its server's, and the control dir its
    server (as ``uid``) binds its socket in."""
    sandbox.root.mkdir(mode=0o711)
    sandbox.code_dir.mkdir(mode=0o755, parents=True)
    control = sandbox.root / "control"
    control.mkdir(mode=0o700)
    os.chown(control, uid, gid)
    launch.server.copy_to(sandbox.root)


def start_container(api: docker.DockerClient, spec: dict[str, Any], reaper: Reaper
                    ) -> Container:
    """Create and start the container of ``spec``; one the engine made is removed when a
    later step fails (by name when the create's answer was lost)."""
    try:
        container = api.containers.create(**spec)
    except UNREACHABLE:
        reaper.remove(spec["name"])
        raise
    try:
        container.start()
        container.reload()
    except BaseException:
        reaper.remove(container.id)
        raise
    return container


def connect(sandbox: DockerSandbox, launch: Launch) -> None:
    """Wait for the container's fork server, seal the control dir, find its processes and
    cgroup; ServerDidNotStart when it did not come up."""
    assert sandbox.container is not None
    init_pid = sandbox.container.attrs["State"]["Pid"]
    if not init_pid:
        raise ServerDidNotStart("container exited at once", last_log(sandbox.container))
    server = launch.server
    path = sandbox.root / "control" / server.socket_name
    try:
        init_fd = os.pidfd_open(init_pid)
    except ProcessLookupError:  # gone since inspect: e.g. the image lacks the interpreter
        raise ServerDidNotStart("container exited at once", last_log(sandbox.container)) from None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not path.exists():
            if select.select([init_fd], [], [], 0.002)[0] or time.monotonic() > deadline:
                raise ServerDidNotStart(f"{server.name} server did not come up",
                                        last_log(sandbox.container))
    finally:
        os.close(init_fd)
    # From now on nothing in the container may write to the host's disk.
    os.chown(path.parent, 0, 0)
    os.chmod(path.parent, 0o755)
    children = psutil.Process(init_pid).children()
    if len(children) != 1:
        raise SandboxError(f"expected one fork server in the container, found {len(children)}")
    server_pid = children[0].pid
    sandbox.server_fd = os.pidfd_open(server_pid)
    sandbox.cgroup = find_cgroup(server_pid)
    sandbox.processes = ContainerProcesses(
        init_pid, server_pid, sandbox.cgroup.procs_file if sandbox.cgroup else None
    )


def last_log(container: Container) -> str:
    """The container's last line of output (docker-init's words when its command failed)."""
    try:
        lines = container.logs(tail=5).decode(errors="replace").strip().splitlines()
    except UNREACHABLE:
        return "no log"
    return lines[-1] if lines else "no output"
