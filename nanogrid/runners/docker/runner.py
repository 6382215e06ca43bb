"""The Docker runner: warm, hardened containers, each with a fork server inside.

A sandbox is one container of the runtime's image whose only process (under docker-init) is
the fork server of nanogrid/runners/forkserver/. The agent talks to it from the host over an
AF_UNIX socket in a bind-mounted directory, so a warm call is a fork inside the container:
no ``docker exec`` (about 50 ms) and no Docker API call at all on the hot path. Limits are
written to, and the per-invocation peak read from, the container's cgroup files directly.
A container whose function has code of its own is frozen as soon as its run is over,
through the same files (nanogrid/runners/freezer.py), and thawed when its next run starts; the
engine sees it running. Where its freezer cannot be reached, nothing is preloaded and an idle
container is paused through the engine after ``docker.pause_grace_seconds``, and unpaused on
acquire.

Host layout per container, under ``docker.socket_dir/<container name>/``:

    control/         -> /nanogrid/control (the fork server's socket; sealed after start)
    forkserver/      -> /nanogrid/forkserver (read-only; a directory python3 runs)
    nodeserver/      -> /nanogrid/nodeserver (read-only; a directory node runs), for node
                        runtimes instead
    code/function/   == sandbox.code_dir; code/ -> /code (read-only), cwd /code/function

``code/`` is mounted rather than ``code/function`` itself because the worker replaces
``code_dir`` (rmtree + mkdir) when a generic container gets its function: a bind mount of
the directory would keep showing the old, deleted one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

import docker
import psutil
from docker.errors import ImageNotFound
from loguru import logger

from nanogrid.common.config import Config, MiB, docker_user_ids
from nanogrid.common.errors import SandboxError

from ..base import Invocation, Sandbox
from ..cgroups import freezer_root
from ..freezer import Freezer, IdleFreezer, anchor
from ..isolation import Isolation, check_metadata_service
from ..launch import Launch
from ..lending import SandboxBoard, alive
from ..pooled import PooledRunner
from ..sandboxclient import RawRun
from ..serversandbox import Meter, ServerSandbox
from .cgroup import ContainerCgroup, ContainerProcesses
from .cleanup import (
    DOCKER_TIMEOUT_S,
    UNREACHABLE,
    describe,
    remove_agent_containers,
)
from .engine import check_engine, container_isolation, image_missing, missing_images
from .reaper import Reaper
from .sandbox import DockerSandbox, ServerDidNotStart, connect, make_host_dir, start_container
from .spec import (
    CODE_MOUNT,
    CODE_SUBDIR,
    CONTAINER_PATH,
    check_config,
    container_launch,
    container_name,
    container_spec,
)

STOPPED_WAIT_S = 5.0
"""How long a container whose server died during a run is given to show as stopped (its OOM
kill recorded) in the engine. The wait ends as soon as the engine shows it stopped; a busy
engine has taken over 2 s to (the run was then counted a sandbox failure, not the
function's OOM)."""


class DockerRunner(PooledRunner):
    name = "docker"
    marker = "[DOCKER]"
    made_at_once = 2
    limit_errors = (OSError, *UNREACHABLE)

    def __init__(
        self, config: Config, worker_index: int, board: SandboxBoard | None = None
    ) -> None:
        self.config = config
        self._worker = worker_index
        self._uid, self._gid = docker_user_ids(config.docker.user)
        self._seq = itertools.count()
        check_config(config)
        self._base_dir = Path(config.docker.socket_dir)
        self._base_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.launches = {name: container_launch(rt.command) for name, rt in config.runtimes.items()}
        self._docker: docker.DockerClient | None = None
        self._docker_lock = threading.Lock()
        self._reaper = Reaper(self._api)
        self.idle = IdleFreezer(self.settled)
        if (root := freezer_root()) is not None:
            anchor(root)
        with contextlib.suppress(SandboxError):  # an engine that is away now is retried later
            self._reaper.remove_dead_workers_containers()
        unavailable = {}
        with contextlib.suppress(SandboxError):  # away: the first create finds out instead
            unavailable = missing_images(self._api(), config)
        self.make_pools(config, worker_index, board, unavailable=unavailable)

    @classmethod
    def check_config(cls, config: Config) -> None:
        check_metadata_service("docker", config.docker.network, config.docker.metadata_service)
        check_config(config)
        check_engine(config)

    @classmethod
    def sandbox_dir(cls, config: Config) -> Path:
        return Path(config.docker.socket_dir)

    def code_path(self, sandbox: Sandbox) -> str:
        return f"{CODE_MOUNT}/{CODE_SUBDIR}"

    @classmethod
    def isolation(cls, config: Config) -> Isolation:
        return container_isolation(config)

    @classmethod
    def runtime_problems(cls, config: Config) -> dict[str, str]:
        try:
            api = docker.from_env(timeout=DOCKER_TIMEOUT_S)
        except UNREACHABLE:
            return {}  # the workers report an engine that is away
        try:
            return missing_images(api, config)
        except SandboxError:
            return {}
        finally:
            api.close()

    @classmethod
    def remove_stale(cls) -> int:
        return remove_agent_containers()

    def close(self) -> None:
        self.close_pools()
        self.idle.close()
        self._reaper.close()
        if self._docker is not None:
            self._docker.close()

    # -- the run's hooks (pooled.py) ---------------------------------------------------------

    def limit(self, sandbox: ServerSandbox, invocation: Invocation) -> Meter:
        assert isinstance(sandbox, DockerSandbox)
        if sandbox.limit_mb != invocation.memory_mb:
            self._set_memory_limit(sandbox, invocation.memory_mb)
        memory = sandbox.cgroup.memory if sandbox.cgroup else None
        if memory is None:
            return Meter(None)
        meter = Meter(memory, memory.oom_kills())
        memory.reset_peak()
        return meter

    def placement(self, sandbox: ServerSandbox, invocation: Invocation
                  ) -> tuple[str, dict[str, str]]:
        return f"{CODE_MOUNT}/{CODE_SUBDIR}", invocation.environment(CONTAINER_PATH, "/tmp")

    def leftovers(self, sandbox: ServerSandbox, launch: Launch) -> bool:
        assert isinstance(sandbox, DockerSandbox)
        return sandbox.processes is None or sandbox.processes.kill_strays()

    def oom_without_cgroup(self, exit_code: int, raw: RawRun) -> bool:
        # No cgroup to ask: a SIGKILL that was not our timeout is the memory limit.
        return exit_code == -signal.SIGKILL and not raw.timed_out

    def died_of_oom(self, sandbox: ServerSandbox) -> bool:
        # A container whose server died stops (docker-init exits with it), and its cgroup may
        # be removed before the OOM count is read; the engine records the OOM kill.
        assert isinstance(sandbox, DockerSandbox)
        if sandbox.processes is None or alive(sandbox.processes.server_pid):
            return False  # it did not die: it broke the protocol, or was cut off
        deadline = time.monotonic() + STOPPED_WAIT_S
        try:
            while True:
                state = self._api().api.inspect_container(sandbox.container_id)["State"]
                if state.get("OOMKilled") or not state.get("Running"):
                    return bool(state.get("OOMKilled"))
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
        except (*UNREACHABLE, KeyError):
            return False

    def freezer(self, sandbox: ServerSandbox) -> Freezer | None:
        assert isinstance(sandbox, DockerSandbox)
        return sandbox.cgroup.freezer if sandbox.cgroup else None

    def explain(self, exc: BaseException) -> str:
        return describe(exc)

    # -- containers ---------------------------------------------------------------------------

    def _api(self) -> docker.DockerClient:
        """The worker's Docker client, made on first use (and again after the engine was away)."""
        with self._docker_lock:
            if self._docker is None:
                try:
                    self._docker = docker.from_env(timeout=DOCKER_TIMEOUT_S)
                except UNREACHABLE as exc:
                    raise SandboxError(f"Docker engine unreachable: {describe(exc)}") from None
            return self._docker

    def create(self, runtime: str) -> DockerSandbox:
        started = time.monotonic()
        api = self._api()
        self._reaper.retry()
        name = container_name(self._worker, runtime, os.getpid(), next(self._seq))
        root = self._base_dir / name
        sandbox = DockerSandbox(
            runtime=runtime,
            name=name,
            code_dir=root / "code" / CODE_SUBDIR,
            root=root,
            limit_mb=self.config.limits.default_memory_mb,
        )
        launch = self.launches[runtime]
        image = self.config.runtimes[runtime].image
        try:
            make_host_dir(sandbox, launch, self._uid, self._gid)
            spec = container_spec(self.config, runtime, launch, name, root, self._worker)
            sandbox.container = start_container(api, spec, self._reaper)
            sandbox.container_id = sandbox.container.id
            connect(sandbox, launch)
        except ImageNotFound:
            self.destroy(sandbox)
            raise self.mark_unavailable(runtime, image_missing(image)) from None
        except (OSError, psutil.Error, SandboxError, *UNREACHABLE) as exc:
            self.destroy(sandbox)
            if isinstance(exc, ServerDidNotStart) and re.search(
                r"exec .* failed: No such file or directory", exc.log  # docker-init's words
            ):
                problem = f"image {image} has no {launch.interpreter} ({exc.log})"
                raise self.mark_unavailable(runtime, problem) from None
            reason = describe(exc) if isinstance(exc, UNREACHABLE) else str(exc)
            raise SandboxError(f"cannot start a {runtime} container: {reason}") from None
        logger.debug(
            f"{self.marker} container {name} ready in {(time.monotonic() - started) * 1000:.0f} ms"
        )
        return sandbox

    # -- lending (pool.py) ---------------------------------------------------------------------

    def describe(self, sandbox: Sandbox) -> dict[str, Any]:
        assert isinstance(sandbox, DockerSandbox)
        cgroup, processes = sandbox.cgroup, sandbox.processes
        return {
            "name": sandbox.name,
            "root": str(sandbox.root),
            "container": sandbox.container_id,
            "init": processes.init_pid if processes else 0,
            "server": processes.server_pid if processes else 0,
            "cgroup": cgroup.describe() if cgroup is not None else None,
            "paused": sandbox.paused,
        }

    def borrow(self, runtime: str, descriptor: dict[str, Any]) -> Sandbox:
        root = Path(descriptor["root"])
        cgroup = ContainerCgroup.of(descriptor["cgroup"]) if descriptor["cgroup"] else None
        return DockerSandbox(
            runtime=runtime,
            name=descriptor["name"],
            code_dir=root / "code" / CODE_SUBDIR,
            root=root,
            container_id=descriptor["container"],
            cgroup=cgroup,
            processes=ContainerProcesses(
                descriptor["init"], descriptor["server"],
                cgroup.procs_file if cgroup is not None else None,
            ),
            paused=bool(descriptor["paused"]),
        )

    def socket_path(self, sandbox: Sandbox) -> str:
        assert isinstance(sandbox, DockerSandbox)
        return str(sandbox.root / "control" / self.launches[sandbox.runtime].server.socket_name)

    def attach(self, sandbox: Sandbox) -> None:
        """Connect to the container's server: gone (killed, the engine gone) is a
        SandboxError; paused (the fallback without a freezer) is unpaused first."""
        assert isinstance(sandbox, DockerSandbox)
        processes = sandbox.processes
        if processes is None or not alive(processes.server_pid) or (
            sandbox.server_fd >= 0 and select.select([sandbox.server_fd], [], [], 0)[0]
        ):
            sandbox.healthy = False
            raise SandboxError(f"container {sandbox.name} is gone")
        if sandbox.paused:
            try:
                self._api().api.unpause(sandbox.container_id)
            except UNREACHABLE as exc:
                if "is not paused" not in str(exc):  # unpaused by an earlier taker: fine
                    sandbox.healthy = False
                    raise SandboxError(f"cannot unpause {sandbox.name}: {describe(exc)}") from None
            sandbox.paused = False
        super().attach(sandbox)

    def pausable(self, sandbox: Sandbox, idle_s: float) -> bool:
        """An idle container the agent cannot freeze, idle past the grace: paused through
        the engine instead (the pool takes it off the board for that)."""
        assert isinstance(sandbox, DockerSandbox)
        freezable = sandbox.cgroup is not None and sandbox.cgroup.freezer is not None
        grace = self.config.docker.pause_grace_seconds
        return not (freezable or sandbox.paused or idle_s < grace)

    def shrinkable(self, sandbox: Sandbox, idle_s: float) -> bool:
        """Not a paused container (one the agent cannot freeze): it stays as it is."""
        assert isinstance(sandbox, DockerSandbox)
        return not sandbox.paused and super().shrinkable(sandbox, idle_s)

    def pause(self, sandbox: Sandbox) -> None:
        assert isinstance(sandbox, DockerSandbox)
        try:
            self._api().api.pause(sandbox.container_id)
            sandbox.paused = True
        except UNREACHABLE as exc:  # it stays warm and running; tried again later
            logger.debug(f"{self.marker} cannot pause {sandbox.name}: {describe(exc)}")

    def _set_memory_limit(self, sandbox: DockerSandbox, memory_mb: int) -> None:
        if sandbox.cgroup is not None:  # a file write instead of a ~12 ms docker update
            sandbox.cgroup.memory.set_limit(memory_mb * MiB)
        else:
            self._api().api.update_container(
                sandbox.container_id, mem_limit=memory_mb * MiB, memswap_limit=memory_mb * MiB
            )
        sandbox.limit_mb = memory_mb

    def destroy(self, sandbox: Sandbox) -> None:
        """Disconnect now; remove in the background."""
        assert isinstance(sandbox, DockerSandbox)
        self.idle.forget(sandbox)
        if sandbox.client is not None:
            sandbox.client.close()
        if sandbox.cgroup is not None and sandbox.processes is not None:
            sandbox.processes.kill_frozen(sandbox.cgroup.freezer)
        if sandbox.server_fd >= 0:
            os.close(sandbox.server_fd)
            sandbox.server_fd = -1
        if sandbox.cgroup is not None:
            sandbox.cgroup.memory.close()
        container = sandbox.container.id if sandbox.container is not None else None
        self._reaper.later(container, sandbox.root)

