"""The host's capacity ledger: what every worker has running, in one page of shared memory.

The budget (``capacity.memory_mb`` and ``capacity.max_concurrent``) is the host's, shared by
all workers rather than split between them, so a task as large as the whole budget still
runs with any number of workers. The arbiter makes the page (a memfd) before it forks, and
every worker inherits it. Slot k holds worker k's running count, the memory it reserved, and
the memory of a task it holds back because it does not fit yet.

Admission is one POSIX record lock (``lockf``) around a read-modify-write of the page: the
kernel drops the lock of a process that dies, so a SIGKILLed worker cannot wedge the others,
and the arbiter zeroes a dead worker's slot when it reaps it. A waiting task is honoured by
everyone: while some worker holds one back, the others admit only what leaves room for it,
so small tasks that keep arriving cannot starve a large one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from dataclasses import dataclass

SLOTS = 256
"""Workers the page has room for (``workers`` is at most 256)."""
_RECORD = struct.Struct("=IIII")
"""running, reserved_mb, waiting_mb, pid."""


@dataclass(frozen=True)
class Usage:
    running: int
    memory_in_use_mb: int
    waiting_mb: int


class Ledger:
    """One host's ledger; ``slot`` is the worker index that admits and releases through it."""

    def __init__(self, memory_mb: int, max_concurrent: int, fd: int | None = None) -> None:
        self.memory_mb = memory_mb
        self.max_concurrent = max_concurrent
        if fd is None:
            fd = os.memfd_create("nanogrid-capacity", 0)  # inherited across fork, not exec
            os.ftruncate(fd, _RECORD.size * SLOTS)
        self.fd = fd
        self._page = mmap.mmap(fd, _RECORD.size * SLOTS, mmap.MAP_SHARED)
        self._threads = threading.Lock()  # lockf does not exclude this process's own threads

    def resize(self, memory_mb: int, max_concurrent: int) -> Ledger:
        """The same page under a new budget (a reload): running tasks stay counted."""
        return Ledger(memory_mb, max_concurrent, self.fd)

    def admit(self, slot: int, memory_mb: int) -> bool:
        """Reserve ``memory_mb`` for one more run of worker ``slot`` if the budget has room,
        leaving room for tasks other workers hold back. Clears this slot's own waiting mark."""
        with self._locked():
            records = self._records()
            running, reserved, _, _ = records[slot]
            used = sum(r[1] for r in records)
            others_waiting = sum(r[2] for i, r in enumerate(records) if i != slot)
            fits = (
                sum(r[0] for r in records) < self.max_concurrent
                and used + memory_mb + others_waiting <= self.memory_mb
            )
            if fits:
                self._write(slot, running + 1, reserved + memory_mb, 0)
            return fits

    def wait_for(self, slot: int, memory_mb: int) -> None:
        """Mark that worker ``slot`` holds back a task of ``memory_mb`` that did not fit."""
        with self._locked():
            running, reserved, _, _ = self._records()[slot]
            self._write(slot, running, reserved, memory_mb)

    def release(self, slot: int, memory_mb: int) -> None:
        """One run of worker ``slot`` ended."""
        with self._locked():
            running, reserved, waiting, _ = self._records()[slot]
            self._write(slot, max(0, running - 1), max(0, reserved - memory_mb), waiting)

    def reset(self, slot: int) -> None:
        """Forget what slot ``slot`` held: its worker is gone (or a new one starts there)."""
        with self._locked():
            self._write(slot, 0, 0, 0)

    def room(self, slot: int) -> tuple[int, int]:
        """(runs, MB) the host could still start for worker ``slot`` now."""
        with self._locked():
            records = self._records()
        running = sum(r[0] for r in records)
        others_waiting = sum(r[2] for i, r in enumerate(records) if i != slot)
        free_mb = self.memory_mb - sum(r[1] for r in records) - others_waiting
        return max(0, self.max_concurrent - running), max(0, free_mb)

    def usage(self) -> Usage:
        with self._locked():
            records = self._records()
        return Usage(
            running=sum(r[0] for r in records),
            memory_in_use_mb=sum(r[1] for r in records),
            waiting_mb=sum(r[2] for r in records),
        )

    def slot_usage(self, slot: int) -> Usage:
        with self._locked():
            running, reserved, waiting, _ = self._records()[slot]
        return Usage(running, reserved, waiting)

    def close(self) -> None:
        self._page.close()

    # -- the page -----------------------------------------------------------------------------

    def _records(self) -> list[tuple[int, int, int, int]]:
        return list(_RECORD.iter_unpack(self._page))

    def _write(self, slot: int, running: int, reserved: int, waiting: int) -> None:
        _RECORD.pack_into(self._page, slot * _RECORD.size, running, reserved, waiting, os.getpid())

    def _locked(self) -> _Locked:
        return _Locked(self)


class _Locked:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __enter__(self) -> None:
        self._ledger._threads.acquire()
        try:
            fcntl.lockf(self._ledger.fd, fcntl.LOCK_EX)
        except BaseException:
            self._ledger._threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self._ledger.fd, fcntl.LOCK_UN)
        finally:
            self._ledger._threads.release()
