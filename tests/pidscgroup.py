"""A pids cgroup for the test process, so hostile code (a fork bomb) cannot take the machine
down: everything the tests start afterwards is held by its ``pids.max``."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


class CgroupError(Exception):
    """The pids cgroup could not be set up; the message is one line."""


class PidsCgroup:
    """A pids cgroup (v1 or v2) holding this process and everything it starts afterwards."""

    def __init__(self, limit: int, name: str | None = None) -> None:
        self.limit = limit
        self.name = name or f"nanogrid-tests-{os.getpid()}"
        self.origin: Path | None = None  # where this process was, and returns to
        self.path: Path | None = None

    def _locate(self) -> tuple[Path, Path]:
        """(the cgroup this process is in, the new cgroup's path)."""
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # unified (v2)
            current = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
            origin = Path("/sys/fs/cgroup") / current.lstrip("/")
            parent = self._v2_parent(Path("/sys/fs/cgroup"), current)
        elif Path("/sys/fs/cgroup/pids").is_dir():  # v1 pids hierarchy
            pids_lines = [line for line in lines if "pids" in line.split(":")[1].split(",")]
            current = pids_lines[0].split(":", 2)[2] if pids_lines else "/"
            origin = parent = Path("/sys/fs/cgroup/pids") / current.lstrip("/")
        else:
            raise CgroupError("no pids cgroup controller found under /sys/fs/cgroup")
        return origin, parent / self.name

    @staticmethod
    def _v2_parent(root: Path, current: str) -> Path:
        # v2 allows controllers for children only in a cgroup without processes of its own
        # (the root excepted): try the current cgroup, then the namespace root.
        for parent in dict.fromkeys([root / current.lstrip("/"), root]):
            if "pids" in (parent / "cgroup.subtree_control").read_text().split():
                return parent
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text("+pids")
                return parent
        raise CgroupError(f"cannot enable the pids controller in {current} or in the root")

    def enter(self) -> None:
        """Create the cgroup with pids.max = limit and move this process into it."""
        try:
            self.origin, path = self._locate()
        except (OSError, StopIteration) as exc:
            raise CgroupError(f"cannot find this process's cgroup: {exc}") from exc
        try:
            path.mkdir(exist_ok=True)
            self.path = path
            (path / "pids.max").write_text(str(self.limit))
            (path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise CgroupError(f"cannot set up {path}: {exc.strerror or exc}") from exc
        if os.getpid() not in self.pids():
            raise CgroupError(f"process {os.getpid()} did not move into {path}")

    def pids(self) -> list[int]:
        """Processes in the cgroup and in any cgroup created below it (by the code under test)."""
        assert self.path is not None, "enter() first"
        found: list[int] = []
        for directory in self._tree():
            with contextlib.suppress(FileNotFoundError):
                found += [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
        return found

    def _tree(self) -> list[Path]:
        """The cgroup and its descendants, deepest first."""
        assert self.path is not None, "enter() first"
        return [Path(directory) for directory, _, _ in os.walk(self.path, topdown=False)]

    def leave(self, spare: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Move this process and the `spare` pids back where this process was, kill what is
        left in the cgroup and below it, remove them; return the pids that had to be killed."""
        assert self.origin is not None and self.path is not None, "enter() first"
        for pid in [os.getpid(), *spare]:
            with contextlib.suppress(ProcessLookupError):
                (self.origin / "cgroup.procs").write_text(str(pid))
        leftovers = self.pids()
        kill_all = self.path / "cgroup.kill"  # v2, Linux 5.14+: kills forks in flight too
        if leftovers and kill_all.exists():
            kill_all.write_text("1")
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for directory in self._tree():
            directory.rmdir()
        return leftovers
