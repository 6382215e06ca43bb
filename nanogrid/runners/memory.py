"""Peak-memory readers: a sandbox's cgroup (v1 or v2), with rusage/psutil as the fallback.

A reader is reset before a run and read after it, so the peak belongs to one invocation:
cgroup v1 resets ``memory.max_usage_in_bytes`` by writing 0 to it; cgroup v2 resets
``memory.peak`` by writing to it (Linux 6.12+), and that reset holds only for reads through
the same file descriptor. So the files read and written around every run stay open for
the cgroup's life (which also spares an open and a close per file and run). On an older v2
kernel the peak cannot be reset, so the reader reports ``None`` and the runner falls back
to the child's rusage.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupMemory:
    """Memory accounting of one cgroup directory."""

    source = "cgroup"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._prefix = f"{directory}/"
        self._open: dict[str, int] = {}
        """The files of every run, by name: open until ``close``."""

    def close(self) -> None:
        """Close the files kept open (the cgroup goes away)."""
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def set_limit(self, limit_bytes: int) -> None:
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def peak_bytes(self) -> int | None:
        raise NotImplementedError

    def oom_kills(self) -> int:
        raise NotImplementedError

    def current_bytes(self) -> int:
        """What the cgroup charges now (an idle sandbox's cost to the host)."""
        raise NotImplementedError

    def _read(self, name: str) -> str:
        fd = os.open(self._prefix + name, os.O_RDONLY)
        try:
            return os.read(fd, 65536).decode()
        finally:
            os.close(fd)

    def _write(self, name: str, value: str) -> None:
        fd = os.open(self._prefix + name, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _kept(self, name: str, flags: int) -> int:
        fd = self._open.get(name)
        if fd is None:
            fd = self._open[name] = os.open(self._prefix + name, flags | os.O_CLOEXEC)
        return fd

    def _read_kept(self, name: str, flags: int = os.O_RDONLY) -> str:
        return os.pread(self._kept(name, flags), 65536, 0).decode()

    def _write_kept(self, name: str, value: str) -> None:
        os.pwrite(self._kept(name, os.O_RDWR), value.encode(), 0)

    def _stat_field(self, name: str, key: str) -> int:
        for line in self._read_kept(name).splitlines():
            field, _, value = line.partition(" ")
            if field == key:
                return int(value)
        return 0


class CgroupV1Memory(CgroupMemory):
    source = "cgroup-v1"

    def set_limit(self, limit_bytes: int) -> None:
        # memsw must stay >= limit: raise whichever order keeps that true at every step.
        has_memsw = (self.directory / "memory.memsw.limit_in_bytes").exists()
        current = int(self._read("memory.limit_in_bytes"))
        if has_memsw and limit_bytes > current:
            self._write("memory.memsw.limit_in_bytes", str(limit_bytes))
        self._write("memory.limit_in_bytes", str(limit_bytes))
        if has_memsw and limit_bytes <= current:
            self._write("memory.memsw.limit_in_bytes", str(limit_bytes))

    def reset_peak(self) -> None:
        self._write_kept("memory.max_usage_in_bytes", "0")

    def peak_bytes(self) -> int | None:
        return int(self._read_kept("memory.max_usage_in_bytes", os.O_RDWR))

    def oom_kills(self) -> int:
        return self._stat_field("memory.oom_control", "oom_kill")

    def current_bytes(self) -> int:
        return int(self._read("memory.usage_in_bytes"))


class CgroupV2Memory(CgroupMemory):
    source = "cgroup-v2"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._resettable = True

    def set_limit(self, limit_bytes: int) -> None:
        self._write("memory.max", str(limit_bytes))
        if (self.directory / "memory.swap.max").exists():
            self._write("memory.swap.max", "0")

    def reset_peak(self) -> None:
        if not self._resettable:
            return
        try:
            self._write_kept("memory.peak", "0")
        except OSError:  # no memory.peak, or one that cannot be written (before Linux 6.12)
            self._resettable = False

    def peak_bytes(self) -> int | None:
        if not self._resettable or "memory.peak" not in self._open:
            return None
        return int(self._read_kept("memory.peak", os.O_RDWR))

    def oom_kills(self) -> int:
        return self._stat_field("memory.events", "oom_kill")

    def current_bytes(self) -> int:
        return int(self._read("memory.current"))


def tree_rss_bytes(pid: int) -> int:
    """Current RSS of a process and its descendants (0 when it is gone): the psutil reader."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total
