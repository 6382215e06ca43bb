"""A Docker sandbox's processes and cgroup as the host sees them: for per-run peaks, limits,
freezing it between runs and killing what a run left behind, without a Docker API call on
the hot path."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ..cgroups import describe_cgroup, described_cgroup, kill_until_gone
from ..freezer import Freezer, freezer_of
from ..memory import CGROUP_ROOT, CgroupMemory, CgroupV1Memory, CgroupV2Memory


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
        """SIGKILL what a run left behind until none is left; False when some are still there
        after ``KILL_WAIT_S`` (``kill_until_gone``)."""
        return kill_until_gone(self.strays)

    def kill_frozen(self, freezer: Freezer | None) -> None:
        """The container is being removed: if it can be frozen, SIGKILL all of its processes,
        docker-init too, then thaw it, so that they end without running again (on v1 a
        killed process stays frozen). The engine removes the rest."""
        if freezer is None:
            return
        for pid in [*self.strays(), self.server_pid, self.init_pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            freezer.thaw()
        freezer.close()


@dataclass(frozen=True)
class ContainerCgroup:
    """The container's cgroup directories, found from one of its processes."""

    memory: CgroupMemory
    pids_dir: Path
    freezer: Freezer | None = None
    """None where its freezer is out of reach (v1 without a freezer hierarchy)."""

    @property
    def procs_file(self) -> Path:
        return self.memory.directory / "cgroup.procs"

    def describe(self) -> dict[str, Any]:
        """What another worker needs to use this cgroup (``of``)."""
        return describe_cgroup(self.memory, self.pids_dir, self.freezer)

    @classmethod
    def of(cls, described: dict[str, Any]) -> ContainerCgroup:
        """Another worker's container's cgroup, from its ``describe``."""
        return cls(*described_cgroup(described))


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
    found = freezer_of(paths)
    freezer = Freezer(*found) if found is not None else None
    return ContainerCgroup(memory, pids_dir, freezer if freezer and freezer.exists() else None)
