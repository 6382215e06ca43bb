"""The process runner: local subprocess sandboxes for hosts without a Docker engine.

A sandbox is one fork server (nanogrid/runners/forkserver/) in a cgroup of its own (memory and pids
limits, per-invocation peak), running as a uid of its own when the agent is root, with a
private directory holding the function's code (read-only to it) and its HOME. Each run is a
fork of that warm server, so a call costs a fork instead of an interpreter start.

When the agent is root the server also sets up, once when it starts, its own mount (private
/tmp, read-only sandbox directory), network (loopback only, unless ``process.network: host``)
and PID namespaces; every run inherits them, so the warm path pays nothing for them. The
server is stdlib-only and does this itself with ctypes (no helper binary, and the same code
still runs unchanged in the Docker images): the agent cannot do it in a preexec step, because
a process does not enter the PID namespace it unshares, only its children do. The rlimits
(``limits.max_open_files``, ``max_file_bytes``, no core dumps) are set on the server, too.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from nanogrid.common.config import Config, MiB
from nanogrid.common.errors import SandboxError

from .. import cgroups
from ..base import Invocation, Sandbox
from ..cgroups import KILL_WAIT_S, SandboxCgroup, SandboxCgroups, owner_group
from ..forkclient import FORKSERVER_SOURCE
from ..freezer import Freezer, IdleFreezer, anchor
from ..isolation import Isolation, check_metadata_service, metadata_exposure
from ..launch import Launch, resolve_launches
from ..lending import SandboxBoard
from ..pooled import PooledRunner
from ..sandbox_server import server_for
from ..sandboxclient import RawRun
from ..serversandbox import Meter, ServerSandbox
from .hostpaths import world_writable
from .template import Forked, Templates
from .uids import SandboxUids, check_sandbox_uids, uid_range
from .workdir import check_traversable, check_work_dir, make_dir, remove_stale_dirs

SANDBOX_START_TIMEOUT_S = 10.0
SANDBOX_END_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 30.0
PRIVATE_HOME = "/tmp"
"""HOME of a sandbox with a mount namespace: its private /tmp, as in a Docker sandbox."""
RLIMIT_AS_HEADROOM = 64 * MiB
"""Address space a Python interpreter maps beyond what it uses; the rlimit fallback adds it."""


@dataclass(eq=False)
class ProcessSandbox(ServerSandbox):
    root: Path = field(default_factory=Path)
    home: Path = field(default_factory=Path)
    uid: int = -1
    process: Forked | None = None
    """Its server, forked by the template (as PID 1 of its PID namespace, where it holds: once
    it is gone, so is every process of the namespace, which the kernel ends before PID 1
    exits)."""
    server_pid: int = -1
    """The sandbox server's pid on the host."""
    holds: tuple[str, ...] = ()
    """The isolations its server set up (forkserver/sandbox.py's isolate)."""
    cgroup: SandboxCgroup | None = None


class ProcessRunner(PooledRunner):
    name = "process"
    marker = "[PROCESS]"
    primed = True

    def __init__(
        self, config: Config, worker_index: int, board: SandboxBoard | None = None
    ) -> None:
        self.config = config
        self._worker = worker_index
        self._as_root = os.geteuid() == 0
        self._seq = itertools.count()
        group = owner_group(worker_index)
        SandboxCgroups.remove_stale()  # sandboxes of the worker this one replaces
        remove_stale_dirs(Path(config.paths.work_dir))
        self._base_dir = Path(config.paths.work_dir) / group
        self._cgroups = SandboxCgroups(group)
        self.idle = IdleFreezer(self.settled)
        if (freezer_root := cgroups.freezer_root()) is not None:
            anchor(freezer_root)
        make_dir(self._base_dir, 0o711)
        self._uids: SandboxUids | None = None
        self._cover: tuple[str, ...] = ()
        """World-writable host paths each sandbox's mount namespace hides (hostpaths.py)."""
        if self._as_root:
            check_traversable(self._base_dir)
            self._uids = SandboxUids(
                uid_range(config.process.sandbox_uid_base, worker_index), worker_index
            )
            if busy := self._uids.defer_busy():
                logger.warning(f"{self.marker} {busy} sandbox uids of worker {worker_index} "
                               "still have processes (an earlier worker's sandboxes?): they "
                               "are handed out last")
            self._cover = world_writable()
        self._templates = Templates({"PATH": config.process.path, "LANG": "C.UTF-8"})
        self.launches, unavailable = resolve_launches(config)
        self.make_pools(config, worker_index, board, unavailable=unavailable)

    @classmethod
    def runtime_problems(cls, config: Config) -> dict[str, str]:
        return resolve_launches(config)[1]

    @classmethod
    def check_config(cls, config: Config) -> None:
        check_metadata_service("process", config.process.network, config.process.metadata_service)
        check_work_dir(Path(config.paths.work_dir), as_root=os.geteuid() == 0)
        if os.geteuid() == 0:
            check_sandbox_uids(config)

    @classmethod
    def isolation(cls, config: Config) -> Isolation:
        holds = ["rlimits"]
        missing: dict[str, str] = {}
        if cgroups.writable():
            holds.append("cgroup")
            if not cgroups.can_freeze():
                missing["freezer"] = (
                    "no cgroup2 tree and no v1 freezer hierarchy: idle sandboxes are not "
                    "frozen, so import-warm is off"
                )
        else:
            missing["cgroup"] = (
                "cgroups not writable: memory and pids limits by rlimits only, and no freezer "
                "for idle sandboxes, so import-warm is off"
            )
            if any(server_for(rt.command).runs_functions_itself for rt in config.runtimes.values()):
                # The node server runs functions in its own process: no per-run rlimits.
                missing["node limits"] = (
                    "without cgroups node sandboxes have no memory or pids limit, and what "
                    "a node run leaves behind lives until its sandbox goes"
                )
        if os.geteuid() != 0:
            for name in ("uid", "mount", "ipc", "network", "pid"):
                missing[name] = "the agent does not run as root"
        else:
            holds.append("uid")
            probed = probe_namespaces(config)
            holds.extend(probed.holds)
            missing.update(probed.missing)
        if "network" not in holds:
            missing.update(metadata_exposure(
                "process", config.process.metadata_service,
                f"sandboxes share the host's network ({missing.get('network', 'no namespace')})",
            ))
        return Isolation(tuple(holds), missing)

    @classmethod
    def remove_stale(cls) -> int:
        return SandboxCgroups.remove_stale()

    def close(self) -> None:
        self.close_pools()
        self._templates.close()
        self.idle.close()
        if self._cgroups.available:
            self._cgroups.remove_all()
        shutil.rmtree(self._base_dir, ignore_errors=True)

    # -- the run's hooks (pooled.py) ---------------------------------------------------------

    def limit(self, sandbox: ServerSandbox, invocation: Invocation) -> Meter:
        assert isinstance(sandbox, ProcessSandbox)
        cgroup = sandbox.cgroup
        if cgroup is None:  # rlimits instead, set in the run's child
            rlimits = {"as": invocation.memory_mb * MiB + RLIMIT_AS_HEADROOM}
            if sandbox.uid >= 0:
                rlimits["nproc"] = invocation.max_pids
            return Meter(None, rlimits=rlimits)
        if sandbox.limit_mb != invocation.memory_mb:
            cgroup.memory.set_limit(invocation.memory_mb * MiB)
            sandbox.limit_mb = invocation.memory_mb
        meter = Meter(cgroup.memory, cgroup.memory.oom_kills())
        cgroup.memory.reset_peak()
        return meter

    def placement(self, sandbox: ServerSandbox, invocation: Invocation
                  ) -> tuple[str, dict[str, str]]:
        assert isinstance(sandbox, ProcessSandbox)
        home = PRIVATE_HOME if "mount" in sandbox.holds else str(sandbox.home)
        return str(sandbox.code_dir), invocation.environment(self.config.process.path, home)

    def leftovers(self, sandbox: ServerSandbox, launch: Launch) -> bool:
        assert isinstance(sandbox, ProcessSandbox)
        # A fork server, as PID 1 of its namespace, ended and reaped every other process
        # before it replied; otherwise (no namespace, or a server that runs functions in its
        # own process) what the run left is killed here.
        pid_1 = "pid" in sandbox.holds
        cgroup = sandbox.cgroup
        if cgroup is None or (pid_1 and not launch.server.runs_functions_itself):
            return True
        if not cgroup.kill_all(spare=sandbox.server_pid):
            logger.warning(f"{self.marker} processes left behind in {sandbox.name} outlived "
                           f"{KILL_WAIT_S:g} s of kills: the sandbox is not kept")
            return False
        if pid_1 and not cgroup.holds_only(sandbox.server_pid):
            # Its server is PID 1 and reaps only the processes it started: an orphan of the
            # run's, dead or killed, would hold a pid of the sandbox's for good.
            logger.info(f"{self.marker} a run left processes in {sandbox.name} that its "
                        f"{launch.server.name} server cannot reap: the sandbox is not kept")
            return False
        return True

    def oom_without_cgroup(self, exit_code: int, raw: RawRun) -> bool:
        return exit_code != 0 and b"MemoryError" in raw.stderr[-4096:]

    def freezer(self, sandbox: ServerSandbox) -> Freezer | None:
        assert isinstance(sandbox, ProcessSandbox)
        return sandbox.cgroup.freezer if sandbox.cgroup is not None else None

    def create(self, runtime: str) -> ProcessSandbox:
        started = time.monotonic()
        name = f"{runtime}-w{self._worker}-{next(self._seq)}"
        root = self._base_dir / name
        sandbox = ProcessSandbox(
            runtime=runtime,
            name=name,
            code_dir=root / "code",
            root=root,
            home=root / "home",
            uid=self._uids.take() if self._uids is not None else -1,
        )
        try:
            self._prepare(sandbox)
        except BaseException:
            self.destroy(sandbox)
            raise
        uid, cgroup, control = sandbox.uid, sandbox.cgroup, root / "control"
        ready_r, ready_w = os.pipe()
        limits = self.config.limits
        options: dict[str, object] = {
            "uid": uid,
            "gid": uid,
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "cgroup2": str(cgroup.cgroup2) if cgroup and cgroup.cgroup2 else None,
            "pdeathsig": True,
            "rlimits": {"nofile": limits.max_open_files, "fsize": limits.max_file_bytes, "core": 0},
        }
        if self._as_root:
            options["isolate"] = {
                "network": self.config.process.network == "none",
                "tmpfs_mb": self.config.process.tmpfs_mb,
                "root": str(root),
                "work_dir": os.path.abspath(self.config.paths.work_dir),
                "cover": self._cover,
            }
        launch = self.launches[runtime]
        server = launch.server
        socket_path = control / server.socket_name
        interpreter = launch.interpreter
        if server.started_by_fork_server:
            # The fork server's start-up makes the sandbox (namespaces, cgroups, rlimits, uid,
            # death signal), then exec's this runtime's own server, which says when it is ready.
            source = server.copy_to(root)
            options["exec"] = server.command(launch.interpreter, str(source), str(socket_path))
            interpreter = sys.executable
        try:
            with os.fdopen(ready_r, "rb") as ready:
                try:
                    sandbox.process = self._templates.of(interpreter).fork(
                        str(socket_path), str(root), options, ready_w)
                finally:
                    os.close(ready_w)
                if not select.select([ready], [], [], SANDBOX_START_TIMEOUT_S)[0]:
                    raise SandboxError(f"{server.name} server did not come up")
                line = ready.readline()
            if not line:
                raise SandboxError(f"{server.name} server exited before it was ready")
            report = json.loads(line)
            sandbox.server_pid = report["pid"]
            sandbox.holds = tuple(report["holds"])
            if server.runs_functions_itself and uid >= 0:
                # As Docker does: the server runs the functions in its own process, so its
                # socket's directory cannot be sealed; from now on it may write only the files
                # it made there (its stdin), not add any to the host's disk.
                os.chown(control, 0, 0)
                os.chmod(control, 0o755)
        except (OSError, SandboxError) as exc:
            self.destroy(sandbox)
            raise SandboxError(f"cannot start a {runtime} sandbox: {exc}") from None
        logger.debug(
            f"{self.marker} sandbox {name} ready in {(time.monotonic() - started) * 1000:.0f} ms"
        )
        return sandbox

    def _prepare(self, sandbox: ProcessSandbox) -> None:
        """The sandbox's directories (its own uid's: no other sandbox has it) and cgroup."""
        root, uid, control = sandbox.root, sandbox.uid, sandbox.root / "control"
        make_dir(root, 0o750)
        make_dir(sandbox.code_dir, 0o755)
        make_dir(sandbox.home, 0o700)
        make_dir(control, 0o700)
        if uid >= 0:
            os.chown(root, 0, uid)
            os.chown(sandbox.home, uid, uid)
            os.chown(control, uid, uid)
        if self._cgroups.available:
            try:
                sandbox.cgroup = self._cgroups.create(sandbox.name)
                sandbox.cgroup.set_pids_limit(self.config.limits.max_pids + 1)
            except OSError as exc:
                raise SandboxError(f"cannot create the sandbox cgroup: {exc}") from None

    # -- lending (pool.py) ---------------------------------------------------------------------

    def describe(self, sandbox: Sandbox) -> dict[str, Any]:
        assert isinstance(sandbox, ProcessSandbox)
        return {
            "name": sandbox.name,
            "root": str(sandbox.root),
            "uid": sandbox.uid,
            "server": sandbox.server_pid,
            "holds": list(sandbox.holds),
            "cgroup": sandbox.cgroup.describe() if sandbox.cgroup is not None else None,
        }

    def borrow(self, runtime: str, descriptor: dict[str, Any]) -> Sandbox:
        root = Path(descriptor["root"])
        found = descriptor["cgroup"]
        return ProcessSandbox(
            runtime=runtime,
            name=descriptor["name"],
            code_dir=root / "code",
            root=root,
            home=root / "home",
            uid=int(descriptor["uid"]),
            server_pid=int(descriptor["server"]),
            holds=tuple(descriptor["holds"]),
            cgroup=SandboxCgroup.of(found) if found else None,
        )

    def socket_path(self, sandbox: Sandbox) -> str:
        assert isinstance(sandbox, ProcessSandbox)
        return str(sandbox.root / "control" / self.launches[sandbox.runtime].server.socket_name)

    def destroy(self, sandbox: Sandbox) -> None:
        assert isinstance(sandbox, ProcessSandbox)
        self.idle.forget(sandbox)
        if sandbox.client is not None:
            sandbox.client.close()
        ended = sandbox.process is None  # nothing ever ran as its uid
        if sandbox.cgroup is not None:
            sandbox.cgroup.kill_frozen()  # else a frozen server would never exit
        if sandbox.process is not None:
            sandbox.process.kill()
            gone = sandbox.process.wait(SANDBOX_END_TIMEOUT_S)
            sandbox.process.close()
            ended = ended or (gone and "pid" in sandbox.holds)  # PID 1: the namespace with it
        if sandbox.cgroup is not None:
            ended = sandbox.cgroup.remove() or ended
        shutil.rmtree(sandbox.root, ignore_errors=True)
        if self._uids is not None and sandbox.uid >= 0:
            self._uids.give_back(sandbox.uid, ended=ended)


def probe_namespaces(config: Config) -> Isolation:
    """Ask a throw-away fork server (``--probe``) which namespaces the kernel grants here."""
    settings = {
        "network": config.process.network == "none",
        "tmpfs_mb": 1,
        "work_dir": os.path.abspath(config.paths.work_dir),
        "cover": world_writable(),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", str(FORKSERVER_SOURCE), "--probe", json.dumps(settings)],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={"PATH": config.process.path, "LANG": "C.UTF-8"},
        )
        report = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        why = f"the namespace probe failed: {exc}"
        return Isolation((), dict.fromkeys(("mount", "ipc", "network", "pid"), why))
    return Isolation(tuple(report["holds"]), report["missing"])
