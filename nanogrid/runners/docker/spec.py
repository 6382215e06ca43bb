"""What a Docker sandbox is made of: its container's hardening, limits, mounts and labels, and
the host paths below ``docker.socket_dir`` they need."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from docker.types import LogConfig, Mount, Ulimit

from nanogrid.common.config import Config, MiB, docker_user_ids
from nanogrid.common.errors import ConfigError

from ..launch import Launch
from ..sandbox_server import FORK, SERVERS, server_for
from .cleanup import labels

CONTROL_MOUNT = "/nanogrid/control"
SERVER_DIR = "/nanogrid"
"""Where the sandbox's server (file or directory) is mounted read-only, under its own name."""
CODE_MOUNT = "/code"
CODE_SUBDIR = "function"
CONTAINER_PATH = "/usr/local/bin:/usr/bin:/bin"
UNIX_PATH_MAX = 107
PID_MAX = 4_194_304
"""The highest pid_max Linux allows: container names hold the worker's pid."""
SEQUENCE_MAX = 9_999_999
"""Container names hold a per-worker sequence number; the socket path check allows this many."""
EXTRA_PIDS = 2
"""docker-init and the fork server count against the container's pids limit too."""
SERVER_OPTIONS = {FORK.name: ('{"own_ipc": true}',)}
"""The fork server's options in a container: its IPC namespace (``ipc_mode="private"``) is
the sandbox's own, so it removes the SysV objects each run leaves there."""


def container_launch(command: tuple[str, ...]) -> Launch:
    """How a runtime's command runs from its server inside the image."""
    server = server_for(command)
    if server.runs_functions_itself:  # the node server: the image needs only node
        return Launch(interpreter=command[0], python=False, argv=command, server=server)
    python = (
        os.path.basename(command[0]).startswith("python")
        and len(command) >= 2
        and not command[1].startswith("-")
    )
    # The fork server itself needs a python3 in the image; a python runtime names its own.
    return Launch(interpreter=command[0] if python else "python3", python=python, argv=command)


def container_name(worker: int, runtime: str, pid: int, seq: int) -> str:
    return f"nanogrid-w{worker}-{runtime[:16]}-{pid}-{seq}"


def check_config(config: Config) -> None:
    """Refuse a ``docker.socket_dir`` the agent cannot make, or too long for the server
    sockets made below it."""
    socket_dir = Path(config.docker.socket_dir)
    nearest = next(p for p in [socket_dir, *socket_dir.parents] if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(
            f"docker.socket_dir: {nearest} is not a directory the agent can write to"
        )
    runtime = max(config.runtimes, key=lambda name: len(name[:16]), default="")
    name = container_name(config.workers - 1, runtime, PID_MAX, SEQUENCE_MAX)
    socket_name = max((server.socket_name for server in SERVERS.values()), key=len)
    longest = Path(config.docker.socket_dir) / name / "control" / socket_name
    if len(os.fsencode(longest)) > UNIX_PATH_MAX:
        raise ConfigError(
            f"docker.socket_dir: {config.docker.socket_dir!r} is too long: the sandboxes' "
            f"socket paths below it would exceed the {UNIX_PATH_MAX} bytes of an AF_UNIX address"
        )


def container_spec(
    config: Config, runtime: str, launch: Launch, name: str, root: Path, worker: int
) -> dict[str, Any]:
    """The keyword arguments of ``containers.create`` for one sandbox of ``runtime``."""
    limits = config.limits
    memory = limits.default_memory_mb * MiB
    server = launch.server
    server_mount = f"{SERVER_DIR}/{server.source.name}"
    return dict(
        image=config.runtimes[runtime].image,
        command=[
            *server.command(
                launch.interpreter, server_mount, f"{CONTROL_MOUNT}/{server.socket_name}"
            ),
            *SERVER_OPTIONS.get(launch.server.name, ()),
        ],
        name=name,
        init=True,  # docker-init reaps what functions orphan
        user="{}:{}".format(*docker_user_ids(config.docker.user)),
        environment={},
        working_dir="/",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],  # and the engine's default seccomp profile
        read_only=True,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={config.docker.tmpfs_mb}m"},
        ipc_mode="private",
        shm_size=config.docker.tmpfs_mb * MiB,
        network_mode=config.docker.network,
        pids_limit=limits.max_pids + EXTRA_PIDS,
        ulimits=[
            Ulimit(name="nofile", soft=limits.max_open_files, hard=limits.max_open_files),
            Ulimit(name="fsize", soft=limits.max_file_bytes, hard=limits.max_file_bytes),
            Ulimit(name="core", soft=0, hard=0),
        ],
        runtime=config.docker.runtime,
        mem_limit=memory,
        memswap_limit=memory,
        nano_cpus=int(config.docker.cpus * 1e9),
        log_config=LogConfig(type="json-file", config={"max-size": "64k", "max-file": "1"}),
        mounts=[
            Mount(CONTROL_MOUNT, str(root / "control"), type="bind"),
            Mount(server_mount, str(root / server.source.name), type="bind", read_only=True),
            Mount(CODE_MOUNT, str(root / "code"), type="bind", read_only=True),
        ],
        labels=labels(worker, runtime, root),
    )
