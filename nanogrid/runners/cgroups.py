"""Cgroups for process-runner sandboxes: memory limit, pids limit, peak memory, kill-all,
and the freezer that stops an idle sandbox (nanogrid/runners/freezer.py).

Sandbox cgroups are made below the agent's own cgroup (``…/nanogrid/<sandbox>``), so an agent
under systemd with ``Delegate=yes`` manages only its own subtree. Works on cgroup v1
(memory + pids hierarchies, and freezer where it is mounted) and v2 (one unified tree). Where
neither can be written (an unprivileged agent), ``SandboxCgroups.available`` is False and the
runner uses rlimits.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from .freezer import Freezer, freezer_of, thaw_guard
from .memory import CGROUP_ROOT, CgroupMemory, CgroupV1Memory, CgroupV2Memory

SUBTREE = "nanogrid"
KILL_WAIT_S = 1.0
"""How long what a run left behind may take to be gone after SIGKILL: a killed process stays
in its cgroup until it is scheduled to exit, late on a loaded host. Processes still there
after it (a fork bomb adding them as fast as they die) spoil the sandbox."""


SETTLE_TRIES = 4
"""How many times ``holds_only`` reads its counts (2, 4 and 6 ms apart) before it takes a task
beyond the server's threads for one that stays."""


def kill_until_gone(victims: Callable[[], list[int]]) -> bool:
    """SIGKILL the processes ``victims`` lists until it lists none; False when some are still
    there after ``KILL_WAIT_S``. Used for a process sandbox's cgroup and a container's."""
    deadline = time.monotonic() + KILL_WAIT_S
    while pids := victims():
        if time.monotonic() > deadline:
            return False
        for pid in pids:  # again each round: a fork bomb adds processes while we kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)
    return True


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


class SandboxCgroup:
    """The cgroup(s) of one sandbox."""

    def __init__(
        self, memory_dir: Path, pids_dir: Path, memory: CgroupMemory,
        freezer: Freezer | None = None, cgroup2: Path | None = None,
    ) -> None:
        self.memory_dir = memory_dir
        self.pids_dir = pids_dir
        self.memory = memory
        self.freezer = freezer
        self.cgroup2 = cgroup2
        """Its directory in a cgroup2 tree (v2: its only one; a hybrid host: its freezer's),
        which its server can be born in (clone3's CLONE_INTO_CGROUP); None on v1 alone."""

    def describe(self) -> dict[str, Any]:
        """What another worker needs to use this cgroup (``of``)."""
        return describe_cgroup(self.memory, self.pids_dir, self.freezer)

    @classmethod
    def of(cls, described: dict[str, Any]) -> SandboxCgroup:
        """Another worker's sandbox's cgroup, from its ``describe``."""
        memory, pids_dir, freezer = described_cgroup(described)
        return cls(memory.directory, pids_dir, memory, freezer)

    @property
    def _dirs(self) -> list[Path]:
        freezer = [self.freezer.directory] if self.freezer is not None else []
        return list(dict.fromkeys([self.memory_dir, self.pids_dir, *freezer]))

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self._dirs]

    def set_pids_limit(self, limit: int) -> None:
        (self.pids_dir / "pids.max").write_text(str(limit))

    def pids(self) -> list[int]:
        try:
            fd = os.open(f"{self.memory_dir}/cgroup.procs", os.O_RDONLY)  # after every run
        except FileNotFoundError:
            return []
        try:
            text = b""
            while chunk := os.read(fd, 65536):
                text += chunk
        finally:
            os.close(fd)
        return [int(p) for p in text.split()]

    def kill_all(self, spare: int | None = None) -> bool:
        """SIGKILL every process in the sandbox but ``spare`` until none is left; False when
        some are still there after ``KILL_WAIT_S`` (``kill_until_gone``)."""
        return kill_until_gone(lambda: [p for p in self.pids() if p != spare])

    def holds_only(self, pid: int) -> bool:
        """Whether the tasks its pids controller counts are ``pid``'s threads and nothing else:
        a process that exited is counted until it is reaped, so a PID 1 that reaps only its own
        children (a node server) leaves any orphan of a run counted here. Threads that start
        or end meanwhile are given a few milliseconds to settle."""
        for attempt in range(SETTLE_TRIES):
            try:
                threads = len(os.listdir(f"/proc/{pid}/task"))
                counted = int((self.pids_dir / "pids.current").read_text())
            except (OSError, ValueError):
                return False
            if counted <= threads:
                return True
            time.sleep(0.002 * (attempt + 1))
        return False

    def kill_frozen(self) -> None:
        """SIGKILL every process in the sandbox, then thaw it: a frozen process dies without
        running again (on v1 even a killed one stays frozen, and would never exit)."""
        if self.freezer is None:
            return
        for pid in self.freezer.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.freezer.thaw()

    def remove(self) -> bool:
        """Kill what runs in it and remove it; True once it is gone: then nothing of the
        sandbox runs any more (the kernel removes only an empty cgroup)."""
        self.memory.close()
        self.kill_frozen()
        self.kill_all()
        if self.freezer is not None:
            self.freezer.close()
        gone = True
        for directory in self._dirs:
            for _ in range(50):  # rmdir is refused until the killed processes are gone
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                gone = False
        return gone


def describe_cgroup(memory: CgroupMemory, pids_dir: Path, freezer: Freezer | None
                    ) -> dict[str, Any]:
    """A sandbox's cgroup as a board descriptor holds it (JSON), for another worker."""
    return {
        "memory": str(memory.directory),
        "pids": str(pids_dir),
        "v2": isinstance(memory, CgroupV2Memory),
        "freezer": [str(freezer.directory), freezer.v2] if freezer is not None else None,
    }


def described_cgroup(described: dict[str, Any]) -> tuple[CgroupMemory, Path, Freezer | None]:
    """The memory reader, pids directory and freezer of a ``describe_cgroup``."""
    directory = Path(described["memory"])
    memory = CgroupV2Memory(directory) if described["v2"] else CgroupV1Memory(directory)
    found = described["freezer"]
    freezer = Freezer(Path(found[0]), bool(found[1])) if found else None
    return memory, Path(described["pids"]), freezer


def owner_group(index: int) -> str:
    """The name for this worker process's sandboxes: ``p<pid>-w<index>``."""
    return f"p{os.getpid()}-w{index}"


def owner_gone(name: str) -> bool:
    """Whether ``name`` is an ``owner_group`` name whose worker process no longer runs."""
    match = re.fullmatch(r"p(\d+)-w\d+", name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _subtree_roots() -> tuple[Path, Path, tuple[Path, bool] | None]:
    """The ``nanogrid`` directories below this process's memory and pids cgroups (v2: one for
    both), and below its freezer's with whether that is v2's
    (nanogrid.runners.freezer.freezer_of)."""
    own = _own_paths()
    found = freezer_of(own)
    freezer = (found[0] / SUBTREE, found[1]) if found is not None else None
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        root = CGROUP_ROOT / own.get("", "/").lstrip("/") / SUBTREE
        return root, root, freezer
    return (
        CGROUP_ROOT / "memory" / own.get("memory", "/").lstrip("/") / SUBTREE,
        CGROUP_ROOT / "pids" / own.get("pids", "/").lstrip("/") / SUBTREE,
        freezer,
    )


def freezer_root() -> Path | None:
    """This process's ``nanogrid`` directory in v1's freezer hierarchy when that is where
    sandboxes are frozen (nanogrid/runners/freezer.py's anchor goes there), else None."""
    freezer = _subtree_roots()[2]
    return freezer[0] if freezer is not None and not freezer[1] else None


def writable() -> bool:
    """Whether sandbox cgroups can be made below this process's cgroup (without making any)."""
    for root in dict.fromkeys(_subtree_roots()[:2]):
        nearest = root if root.exists() else root.parent
        if not os.access(nearest, os.W_OK):
            return False
    return True


def can_freeze() -> bool:
    """Whether sandbox cgroups made here can be frozen (a cgroup2 tree or v1's freezer)."""
    return writable() and _subtree_roots()[2] is not None


class SandboxCgroups:
    """Makes sandbox cgroups under ``<agent's cgroup>/nanogrid/<group>/``."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        memory_root, pids_root, freezer = _subtree_roots()
        self._memory_base = memory_root / group
        self._pids_base = pids_root / group
        self._freezer_base = freezer[0] / group if freezer is not None else None
        self._freezer_v2 = freezer is not None and freezer[1]
        self._guard: subprocess.Popen | None = None
        self.available = self._prepare()

    @staticmethod
    def remove_stale() -> int:
        """Remove the sandbox cgroups of workers that are gone (an earlier agent's too).

        Groups are named after their worker's pid (``owner_group``), so the sandboxes of a
        live agent or test run that shares this cgroup are left alone.
        """
        memory_root, pids_root, freezer = _subtree_roots()
        roots = [memory_root, pids_root, *([freezer[0]] if freezer is not None else [])]
        groups = {
            child.name
            for root in dict.fromkeys(roots)
            if root.is_dir()
            for child in root.iterdir()
            if child.is_dir() and owner_gone(child.name)
        }
        return sum(SandboxCgroups(group).remove_all() for group in sorted(groups))

    @property
    def _bases(self) -> list[Path]:
        freezer = [self._freezer_base] if self._freezer_base is not None else []
        return list(dict.fromkeys([self._memory_base, self._pids_base, *freezer]))

    def _prepare(self) -> bool:
        try:
            for base in dict.fromkeys([self._memory_base, self._pids_base]):
                base.mkdir(parents=True, exist_ok=True)
            if self.v2:
                self._enable_v2_controllers()
        except OSError as exc:
            logger.warning(f"[PROCESS] no cgroups for sandboxes ({exc}); falling back to rlimits")
            return False
        if self._freezer_base is not None:
            try:
                self._freezer_base.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                logger.warning(f"[PROCESS] no freezer for sandboxes ({exc}): import-warm is off")
                self._freezer_base = None
        return True

    def _enable_v2_controllers(self) -> None:
        top = self._memory_base.parent
        for directory in (top.parent, top, self._memory_base):
            (directory / "cgroup.subtree_control").write_text("+memory +pids")

    def create(self, name: str) -> SandboxCgroup:
        memory_dir = self._memory_base / name
        pids_dir = self._pids_base / name
        freezer_dir = self._freezer_base / name if self._freezer_base is not None else None
        for directory in dict.fromkeys(d for d in (memory_dir, pids_dir, freezer_dir) if d):
            directory.mkdir(exist_ok=True)
        memory = CgroupV2Memory(memory_dir) if self.v2 else CgroupV1Memory(memory_dir)
        freezer = None
        if freezer_dir is not None:
            freezer = Freezer(freezer_dir, self._freezer_v2)
            if not self._freezer_v2 and self._guard is None:
                self._guard = thaw_guard(freezer_dir.parent)
        cgroup2 = memory_dir if self.v2 else freezer_dir if self._freezer_v2 else None
        return SandboxCgroup(memory_dir, pids_dir, memory, freezer, cgroup2)

    def remove_all(self) -> int:
        """Remove every sandbox cgroup of this group (leftovers of an earlier agent too)."""
        names = sorted(
            {child.name for base in self._bases if base.is_dir() for child in base.iterdir()
             if child.is_dir()}
        )
        for name in names:
            freezer = None
            if self._freezer_base is not None:
                freezer = Freezer(self._freezer_base / name, self._freezer_v2)
            memory_dir = self._memory_base / name
            SandboxCgroup(memory_dir, self._pids_base / name, CgroupV1Memory(memory_dir),
                          freezer).remove()
        for base in self._bases:
            with contextlib.suppress(OSError):
                base.rmdir()
        if self._guard is not None and self._guard.stdin is not None:
            self._guard.stdin.close()  # nothing left to guard
            self._guard.wait()
        return len(names)
