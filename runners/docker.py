"""The Docker runner: warm, hardened containers, each with a fork server inside.

A sandbox is one container of the runtime's image whose only process (under docker-init) is
the fork server of runners/forkserver.py. The agent talks to it from the host over an
AF_UNIX socket in a bind-mounted directory, so a warm call is a fork inside the container:
no ``docker exec`` (about 50 ms) and no Docker API call at all on the hot path. Limits are
written to, and the per-invocation peak read from, the container's cgroup files directly.
An idle container is paused after ``docker.pause_grace_seconds`` and unpaused on acquire.

Host layout per container, under ``docker.socket_dir/<container name>/``:

    control/         -> /nanogrid/control (the fork server's socket; sealed after start)
    forkserver.py    -> /nanogrid/forkserver.py (read-only)
    code/function/   == sandbox.code_dir; code/ -> /code (read-only), cwd /code/function

``code/`` is mounted rather than ``code/function`` itself because the worker replaces
``code_dir`` (rmtree + mkdir) when a generic container gets its function: a bind mount of
the directory would keep showing the old, deleted one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import select
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import psutil
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import LogConfig, Mount
from loguru import logger
from requests.exceptions import RequestException

from supervisor.config import Config, MiB, docker_user_ids
from supervisor.errors import ConfigError, SandboxError

from .base import Invocation, PooledRunner, RunOutcome, Sandbox
from .forkclient import FORKSERVER_SOURCE, ForkServerClient
from .memory import CGROUP_ROOT, CgroupMemory, CgroupV1Memory, CgroupV2Memory
from .process import Launch

AGENT_LABEL = "nanogrid.agent"
WORKER_LABEL = "nanogrid.worker"
RUNTIME_LABEL = "nanogrid.runtime"
PID_LABEL = "nanogrid.pid"
"""The worker process that owns the container: a new worker removes the dead ones' leftovers."""
DIR_LABEL = "nanogrid.dir"
"""The container's host directory, removed with it (also by an agent that did not make it)."""

CONTROL_MOUNT = "/nanogrid/control"
SERVER_MOUNT = "/nanogrid/forkserver.py"
CODE_MOUNT = "/code"
CODE_SUBDIR = "function"
CONTAINER_PATH = "/usr/local/bin:/usr/bin:/bin"
SOCKET_NAME = "forkserver.sock"
UNIX_PATH_MAX = 107
PID_MAX = 4_194_304
"""The highest pid_max Linux allows: container names hold the worker's pid."""
SEQUENCE_MAX = 9_999_999
"""Container names hold a per-worker sequence number; the socket path check allows this many."""
EXTRA_PIDS = 2
"""docker-init and the fork server count against the container's pids limit too."""
DOCKER_TIMEOUT_S = 30
START_TIMEOUT_S = 20.0
KILL_ROUNDS = 20
UNREACHABLE = (DockerException, RequestException)
"""What the Docker SDK raises when the engine is gone, refuses, or times out."""


def agent_id() -> str:
    """This agent's label value: stable per host, so a restarted agent finds its leftovers."""
    return socket.gethostname()


def describe(exc: BaseException) -> str:
    """One line for people from a Docker SDK error."""
    if isinstance(exc, RequestException):
        return f"Docker engine unreachable ({type(exc).__name__})"
    explanation = getattr(exc, "explanation", None)
    text = str(explanation or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ContainerProcesses:
    """The processes of one container as the host sees them (host pids)."""

    def __init__(self, init_pid: int, server_pid: int, procs_file: Path | None) -> None:
        self.init_pid = init_pid
        self.server_pid = server_pid
        self.procs_file = procs_file

    def strays(self) -> list[int]:
        """Everything but docker-init and the fork server: what a run left behind."""
        if self.procs_file is not None:
            try:
                pids = [int(p) for p in self.procs_file.read_text().split()]
            except FileNotFoundError:
                return []
        else:  # without the cgroup: every process in the container descends from its init
            try:
                pids = [p.pid for p in psutil.Process(self.init_pid).children(recursive=True)]
            except psutil.Error:
                return []
        return [p for p in pids if p not in (self.init_pid, self.server_pid)]

    def kill_strays(self) -> bool:
        """SIGKILL what a run left behind; False when processes keep appearing."""
        for _ in range(KILL_ROUNDS):  # a fork bomb may add processes while we kill
            victims = self.strays()
            if not victims:
                return True
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
        return not self.strays()


@dataclass(frozen=True)
class ContainerCgroup:
    """The container's cgroup directories, found from one of its processes."""

    memory: CgroupMemory
    pids_dir: Path

    @property
    def procs_file(self) -> Path:
        return self.memory.directory / "cgroup.procs"


def find_cgroup(pid: int) -> ContainerCgroup | None:
    """The cgroup of host process ``pid`` (cgroupfs or systemd driver, v1 or v2), if readable."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    paths: dict[str, str] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path.lstrip("/")
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        directory = CGROUP_ROOT / paths.get("", "")
        memory: CgroupMemory = CgroupV2Memory(directory)
        pids_dir, probe = directory, "memory.current"
    elif "memory" in paths and "pids" in paths:
        memory = CgroupV1Memory(CGROUP_ROOT / "memory" / paths["memory"])
        pids_dir, probe = CGROUP_ROOT / "pids" / paths["pids"], "memory.max_usage_in_bytes"
    else:
        return None
    if not (memory.directory / probe).exists() or not (pids_dir / "pids.max").exists():
        return None  # e.g. an agent in another cgroup namespace: paths are not ours to read
    return ContainerCgroup(memory, pids_dir)


@dataclass(eq=False)
class DockerSandbox(Sandbox):
    root: Path = field(default_factory=Path)
    container: Container | None = None
    client: ForkServerClient | None = None
    cgroup: ContainerCgroup | None = None
    processes: ContainerProcesses | None = None
    server_fd: int = -1
    """A pidfd of the fork server: readable once it is gone (container killed, engine gone)."""
    limit_mb: int = 0
    paused: bool = False


def container_launch(command: tuple[str, ...]) -> Launch:
    """How a runtime's command runs from the fork server inside the image."""
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
    """Refuse a ``docker.socket_dir`` too long for the fork-server sockets made below it."""
    runtime = max(config.runtimes, key=lambda name: len(name[:16]), default="")
    name = container_name(config.workers - 1, runtime, PID_MAX, SEQUENCE_MAX)
    longest = Path(config.docker.socket_dir) / name / "control" / SOCKET_NAME
    if len(os.fsencode(longest)) > UNIX_PATH_MAX:
        raise ConfigError(
            f"docker.socket_dir: {config.docker.socket_dir!r} is too long: the sandboxes' "
            f"socket paths below it would exceed the {UNIX_PATH_MAX} bytes of an AF_UNIX address"
        )


class DockerRunner(PooledRunner):
    name = "docker"
    marker = "[DOCKER]"

    def __init__(self, config: Config, worker_index: int) -> None:
        self._config = config
        self._worker = worker_index
        self._uid, self._gid = docker_user_ids(config.docker.user)
        self._seq = itertools.count()
        check_config(config)
        self._base_dir = Path(config.docker.socket_dir)
        self._base_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self._launch = {name: container_launch(rt.command) for name, rt in config.runtimes.items()}
        self._docker: docker.DockerClient | None = None
        self._docker_lock = threading.Lock()
        self._unremoved: set[str] = set()
        """Containers (ids or names) whose removal failed (engine away); retried before each
        create and on close."""
        self._doomed: queue.SimpleQueue[DockerSandbox | None] = queue.SimpleQueue()
        self._reaper = threading.Thread(target=self._reap, name="docker-reaper", daemon=True)
        self._reaper.start()
        with contextlib.suppress(SandboxError):  # an engine that is away now is retried later
            self._remove_dead_workers_containers()
        self.make_pools(config, worker_index, on_idle=self._on_idle)

    def acquire(self, runtime: str, code_key: str) -> Sandbox:
        pool = self.pools[runtime]
        while True:  # bounded: a dead sandbox is destroyed, and a cold one is alive or raises
            sandbox = pool.acquire(code_key)
            assert isinstance(sandbox, DockerSandbox)
            if self._ready(sandbox):
                return sandbox
            pool.release(sandbox)

    def close(self) -> None:
        self.close_pools()
        self._doomed.put(None)
        self._reaper.join()
        if self._unremoved:
            with contextlib.suppress(SandboxError):
                self._retry_removals()
        if self._docker is not None:
            self._docker.close()

    def run(self, sandbox: Sandbox, invocation: Invocation) -> RunOutcome:
        assert isinstance(sandbox, DockerSandbox) and sandbox.client is not None
        launch = self._launch[sandbox.runtime]
        memory = sandbox.cgroup.memory if sandbox.cgroup else None
        oom_before = 0
        try:
            if sandbox.limit_mb != invocation.memory_mb:
                self._set_memory_limit(sandbox, invocation.memory_mb)
            if memory is not None:
                oom_before = memory.oom_kills()
                memory.reset_peak()
        except (OSError, *UNREACHABLE) as exc:
            sandbox.healthy = False
            raise SandboxError(f"cannot set the container's limits: {describe(exc)}") from None
        env = invocation.environment(CONTAINER_PATH, "/tmp")
        started = time.monotonic()
        try:
            raw = sandbox.client.run(
                argv=list(launch.argv),
                cwd=f"{CODE_MOUNT}/{CODE_SUBDIR}",
                env=env,
                python=launch.python,
                stdin=invocation.stdin,
                timeout_s=invocation.timeout_ms / 1000,
                max_output_bytes=invocation.max_output_bytes,
            )
            exit_code = os.waitstatus_to_exitcode(raw.status)
        except SandboxError:
            sandbox.healthy = False
            peak, oom_kills = self._measure(sandbox, oom_before)
            if not oom_kills:
                raise
            # The OOM killer took the fork server instead of the function: still the
            # function's out-of-memory, only its output is lost with the server.
            return RunOutcome(
                exit_code=-signal.SIGKILL,
                timed_out=False,
                oom_killed=True,
                stdout=b"",
                stderr=b"",
                stdout_truncated=False,
                stderr_truncated=False,
                duration_ms=(time.monotonic() - started) * 1000,
                peak_memory_bytes=invocation.memory_mb * MiB if peak is None else peak,
                peak_source=memory.source if memory else "rusage",
            )
        except (KeyError, TypeError, ValueError) as exc:  # the reply is not what ours sends
            sandbox.healthy = False
            raise SandboxError(f"sandbox fork server misbehaved: {exc!r}") from None
        sandbox.runs += 1
        measured, oom_kills = self._measure(sandbox, oom_before)
        killed = exit_code == -signal.SIGKILL and not raw.timed_out
        # Without a cgroup to ask, a SIGKILL that was not our timeout is the memory limit.
        oom = killed and (oom_kills > 0 or memory is None)
        if raw.timed_out or oom or oom_kills:
            sandbox.healthy = False
        elif sandbox.processes is not None:
            sandbox.healthy = sandbox.processes.kill_strays()
        peak, source = raw.maxrss_bytes, "rusage"  # v2 without a resettable peak, or no cgroup
        if measured is not None and memory is not None:
            peak, source = measured, memory.source
        return RunOutcome.from_raw(
            raw, exit_code=exit_code, oom_killed=oom, peak=peak, source=source
        )

    @staticmethod
    def _measure(sandbox: DockerSandbox, oom_before: int) -> tuple[int | None, int]:
        """The run's cgroup peak (None when unknown) and the OOM kills during the run."""
        if sandbox.cgroup is None:
            return None, 0
        try:
            memory = sandbox.cgroup.memory
            return memory.peak_bytes(), memory.oom_kills() - oom_before
        except OSError:  # the container went away under the run
            sandbox.healthy = False
            return None, 0

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
        if self._unremoved:
            self._retry_removals()
        name = container_name(self._worker, runtime, os.getpid(), next(self._seq))
        root = self._base_dir / name
        sandbox = DockerSandbox(
            runtime=runtime,
            name=name,
            code_dir=root / "code" / CODE_SUBDIR,
            root=root,
            limit_mb=self._config.limits.default_memory_mb,
        )
        try:
            self._make_host_dir(sandbox)
            sandbox.container = self._start_container(api, runtime, name, root)
            self._connect(sandbox)
        except (OSError, psutil.Error, SandboxError, *UNREACHABLE) as exc:
            self.destroy(sandbox)
            reason = describe(exc) if isinstance(exc, UNREACHABLE) else str(exc)
            raise SandboxError(f"cannot start a {runtime} container: {reason}") from None
        logger.debug(
            f"{self.marker} container {name} ready in {(time.monotonic() - started) * 1000:.0f} ms"
        )
        return sandbox

    def _make_host_dir(self, sandbox: DockerSandbox) -> None:
        sandbox.root.mkdir(mode=0o711)
        sandbox.code_dir.mkdir(mode=0o755, parents=True)
        control = sandbox.root / "control"
        control.mkdir(mode=0o700)
        os.chown(control, self._uid, self._gid)  # the fork server binds its socket here
        shutil.copyfile(FORKSERVER_SOURCE, sandbox.root / "forkserver.py")
        os.chmod(sandbox.root / "forkserver.py", 0o644)

    def _start_container(
        self, api: docker.DockerClient, runtime: str, name: str, root: Path
    ) -> Container:
        config, limits = self._config, self._config.limits
        image = config.runtimes[runtime].image
        memory = limits.default_memory_mb * MiB
        try:
            container = api.containers.create(
                image,
                [
                    self._launch[runtime].interpreter,
                    "-I",
                    "-S",
                    SERVER_MOUNT,
                    f"{CONTROL_MOUNT}/{SOCKET_NAME}",
                ],
                name=name,
                init=True,  # docker-init reaps what functions orphan
                user=f"{self._uid}:{self._gid}",
                environment={},
                working_dir="/",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={config.docker.tmpfs_mb}m"},
                ipc_mode="private",
                shm_size=config.docker.tmpfs_mb * MiB,
                network_mode=config.docker.network,
                pids_limit=limits.max_pids + EXTRA_PIDS,
                mem_limit=memory,
                memswap_limit=memory,
                nano_cpus=int(config.docker.cpus * 1e9),
                log_config=LogConfig(type="json-file", config={"max-size": "64k", "max-file": "1"}),
                mounts=[
                    Mount(CONTROL_MOUNT, str(root / "control"), type="bind"),
                    Mount(SERVER_MOUNT, str(root / "forkserver.py"), type="bind", read_only=True),
                    Mount(CODE_MOUNT, str(root / "code"), type="bind", read_only=True),
                ],
                labels={
                    AGENT_LABEL: agent_id(),
                    WORKER_LABEL: str(self._worker),
                    RUNTIME_LABEL: runtime,
                    PID_LABEL: str(os.getpid()),
                    DIR_LABEL: str(root),
                },
            )
        except ImageNotFound:
            raise SandboxError(
                f"image {image} is not on this host (docker pull it, or bin/nanogrid-build-images)"
            ) from None
        except UNREACHABLE:
            # The engine may have made it before its answer was lost: remove it by its name.
            self._remove_container(name)
            raise
        try:
            container.start()
            container.reload()
        except BaseException:
            self._remove_container(container.id)
            raise
        return container

    def _connect(self, sandbox: DockerSandbox) -> None:
        """Wait for the fork server, connect, seal the control dir, find the processes."""
        assert sandbox.container is not None
        init_pid = sandbox.container.attrs["State"]["Pid"]
        if not init_pid:
            raise SandboxError(f"container exited at once: {self._last_log(sandbox.container)}")
        path = sandbox.root / "control" / SOCKET_NAME
        init_fd = os.pidfd_open(init_pid)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not path.exists():
                if select.select([init_fd], [], [], 0.002)[0] or time.monotonic() > deadline:
                    raise SandboxError(
                        f"fork server did not come up: {self._last_log(sandbox.container)}"
                    )
        finally:
            os.close(init_fd)
        sandbox.client = ForkServerClient(path)
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

    @staticmethod
    def _last_log(container: Container) -> str:
        try:
            lines = container.logs(tail=5).decode(errors="replace").strip().splitlines()
        except UNREACHABLE:
            return "no log"
        return lines[-1] if lines else "no output"

    def _ready(self, sandbox: DockerSandbox) -> bool:
        """Unpause the sandbox if needed; False (and unhealthy) when it is no longer usable."""
        if sandbox.server_fd < 0 or select.select([sandbox.server_fd], [], [], 0)[0]:
            logger.warning(f"{self.marker} container {sandbox.name} is gone; replacing it")
            sandbox.healthy = False
            return False
        if sandbox.paused:
            assert sandbox.container is not None
            try:
                sandbox.container.unpause()
            except UNREACHABLE as exc:
                logger.warning(f"{self.marker} cannot unpause {sandbox.name}: {describe(exc)}")
                sandbox.healthy = False
                return False
            sandbox.paused = False
        return True

    def _on_idle(self, sandbox: Sandbox, idle_s: float) -> None:
        """Pause a container idle past the grace (a busy function is not paused per call)."""
        assert isinstance(sandbox, DockerSandbox)
        if sandbox.paused or idle_s < self._config.docker.pause_grace_seconds:
            return
        assert sandbox.container is not None
        try:
            sandbox.container.pause()
            sandbox.paused = True
        except UNREACHABLE as exc:  # it stays warm and running; retried on the next tick
            logger.debug(f"{self.marker} cannot pause {sandbox.name}: {describe(exc)}")

    def _set_memory_limit(self, sandbox: DockerSandbox, memory_mb: int) -> None:
        if sandbox.cgroup is not None:  # a file write instead of a ~12 ms docker update
            sandbox.cgroup.memory.set_limit(memory_mb * MiB)
        else:
            assert sandbox.container is not None
            sandbox.container.update(mem_limit=memory_mb * MiB, memswap_limit=memory_mb * MiB)
        sandbox.limit_mb = memory_mb

    def destroy(self, sandbox: Sandbox) -> None:
        """Disconnect now; remove in the background, so no worker waits ~100 ms for it."""
        assert isinstance(sandbox, DockerSandbox)
        if sandbox.client is not None:
            sandbox.client.close()
        if sandbox.server_fd >= 0:
            os.close(sandbox.server_fd)
            sandbox.server_fd = -1
        self._doomed.put(sandbox)

    def _reap(self) -> None:
        while (sandbox := self._doomed.get()) is not None:
            if sandbox.container is not None:
                self._remove_container(sandbox.container.id)
            shutil.rmtree(sandbox.root, ignore_errors=True)

    def _remove_container(self, container: str) -> None:
        """Force-remove a container by id or name; remember it for a retry if that fails."""
        try:
            self._api().api.remove_container(container, force=True)
            self._unremoved.discard(container)
        except NotFound:
            self._unremoved.discard(container)
        except (SandboxError, *UNREACHABLE) as exc:
            self._unremoved.add(container)
            logger.warning(
                f"{self.marker} cannot remove container {container[:40]} now "
                f"({describe(exc)}); will retry"
            )

    def _retry_removals(self) -> None:
        for container in list(self._unremoved):
            self._remove_container(container)

    def _remove_dead_workers_containers(self) -> None:
        """Remove containers of this agent whose worker process is gone (e.g. SIGKILLed)."""
        try:
            removed = _remove_orphans(self._api())
        except UNREACHABLE as exc:
            raise SandboxError(describe(exc)) from None
        if removed:
            logger.info(f"{self.marker} removed {removed} container(s) of exited workers")


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


def _remove_orphans(api: docker.DockerClient) -> int:
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
        return _remove_orphans(api)
    except UNREACHABLE as exc:
        logger.warning(f"[DOCKER] cannot remove leftover containers: {describe(exc)}")
        return 0
    finally:
        api.close()
