"""The disks a worker writes (code cache, sandboxes' code, outbox) as a budgeted resource.

A full disk turns a host into a black hole: it keeps taking tasks at full speed and fails
each one for its own sake. So before each receive the worker asks ``trouble()``: every
watched file system must keep ``paths.min_free_mb`` free. Short of it, the worker first
frees what it can (cached zips, then idle sandboxes' unpacked code, least recently used
first) and looks again. Still short, or after a task met ENOSPC (``full``), the worker is
DEGRADED and takes no new work until the space is back and a probe write works.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from loguru import logger

MiB = 2**20
PROBE_BYTES = MiB
"""What a probe write after a full disk must fit (with paths.min_free_mb beside it)."""
CHECK_EVERY_S = 1.0
"""How often free space is looked at while all is well (a statvfs per watched disk)."""


class DiskGuard:
    def __init__(
        self,
        directories: Sequence[Path],
        min_free_mb: int,
        freers: Sequence[Callable[[], int]] = (),
    ) -> None:
        """``freers`` free space when it runs short, each returning how much it freed
        (anything > 0 means "look again"), tried in order."""
        self._directories = _one_per_disk(directories)
        self._min_free = min_free_mb * MiB
        self._freers = freers
        self._suspect: str | None = None
        """Why the last check failed (or a task met ENOSPC): recovery then needs a probe."""
        self._checked = -CHECK_EVERY_S

    def full(self, why: str) -> None:
        """A task met a full disk: no new work until ``trouble`` finds space again."""
        self._suspect = why

    def trouble(self) -> str | None:
        """None while every disk has room; else what is short (freeing what it can first)."""
        now = time.monotonic()
        if self._suspect is None and now - self._checked < CHECK_EVERY_S:
            return None
        self._checked = now
        short = self._short()
        if short is not None and self._free_up():
            short = self._short()
        if short is None and self._suspect is not None:
            short = self._probe()
        self._suspect = short
        return short

    def _short(self) -> str | None:
        for directory in self._directories:
            try:
                st = os.statvfs(directory)
            except OSError as exc:
                return f"cannot look at {directory}: {exc.strerror}"
            free = st.f_bavail * st.f_frsize
            if free < self._min_free:
                return (f"{directory} has {free // MiB} MB free, under paths.min_free_mb "
                        f"({self._min_free // MiB} MB)")
        return None

    def _free_up(self) -> bool:
        freed = False
        for freer in self._freers:
            try:
                freed = freer() > 0 or freed
            except OSError as exc:
                logger.warning(f"[DISK] could not free space: {exc}")
        return freed

    def _probe(self) -> str | None:
        """Write, sync and remove a small file on each disk: None when all took it."""
        for directory in self._directories:
            path = directory / f".nanogrid-probe-{os.getpid()}"
            try:
                with open(path, "wb") as f:
                    f.write(b"\0" * PROBE_BYTES)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                return f"a probe write to {directory} failed: {exc.strerror}"
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
        return None


def _one_per_disk(directories: Sequence[Path]) -> list[Path]:
    """The nearest existing directory of each path, one per file system."""
    seen: dict[int, Path] = {}
    for directory in directories:
        existing = next(p for p in [Path(directory), *Path(directory).parents] if p.exists())
        seen.setdefault(existing.stat().st_dev, existing)
    return list(seen.values())
