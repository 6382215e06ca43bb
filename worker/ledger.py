"""The host's capacity ledger: what every worker has running, in one page of shared memory.

The budget (``capacity.memory_mb`` and ``capacity.max_concurrent``) is the host's, shared by
all workers rather than split between them, so a task as large as the whole budget still
runs with any number of workers. The arbiter makes the page (a memfd) before it forks, and
every worker inherits it. Slot k holds worker k's running count and the memory its runs
reserved, and what it holds: room for the messages it is about to receive, or for a task it
received that does not fit yet.

Admission is one POSIX record lock (``lockf``) around a read-modify-write of the page: the
kernel drops the lock of a process that dies, so a SIGKILLed worker cannot wedge the others,
and the arbiter zeroes a dead worker's slot when it reaps it. A waiting task is honoured by
everyone: while some worker holds one back, the others admit only what leaves room for it,
so small tasks that keep arriving cannot starve a large one; and while one worker is
receiving, the others count the room it asked for as taken, so two workers never take the
same free room from SQS at once.
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
"""running, reserved_mb, held_runs, held_mb."""
_PAGE = struct.Struct("=" + "I" * 4 * SLOTS)


@dataclass(frozen=True)
class Usage:
    running: int
    memory_in_use_mb: int
    held_mb: int
    """Room held for messages being received or waiting to start."""


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
        leaving what other workers hold."""
        with self._locked():
            running, reserved, held_runs, held_mb = self._record(slot)
            runs, free_mb = self._free(slot)
            fits = runs >= 1 and memory_mb <= free_mb
            if fits:
                self._write(slot, running + 1, reserved + memory_mb, held_runs, held_mb)
            return fits

    def hold_for_receive(self, slot: int, typical_mb: int, smallest_mb: int, most: int) -> int:
        """How many messages worker ``slot`` may receive now (at most ``most``), counting each
        as ``typical_mb``; that room is held for it until ``hold`` changes it."""
        with self._locked():
            runs, free_mb = self._free(slot)
            wanted = 0 if runs == 0 or free_mb < smallest_mb else max(
                1, min(most, runs, free_mb // typical_mb)
            )
            running, reserved, _, _ = self._record(slot)
            self._write(slot, running, reserved, wanted, min(free_mb, wanted * typical_mb))
            return wanted

    def hold(self, slot: int, runs: int, memory_mb: int) -> None:
        """What worker ``slot`` holds now: a task that waits for room (1, its memory), or
        nothing (0, 0)."""
        with self._locked():
            running, reserved, _, _ = self._record(slot)
            self._write(slot, running, reserved, runs, memory_mb)

    def release(self, slot: int, memory_mb: int) -> None:
        """One run of worker ``slot`` ended."""
        with self._locked():
            running, reserved, held_runs, held_mb = self._record(slot)
            self._write(
                slot, max(0, running - 1), max(0, reserved - memory_mb), held_runs, held_mb
            )

    def reset(self, slot: int) -> None:
        """Forget what slot ``slot`` held: its worker is gone (or a new one starts there)."""
        with self._locked():
            self._write(slot, 0, 0, 0, 0)

    def room(self, slot: int) -> tuple[int, int]:
        """(runs, MB) the host could still start for worker ``slot`` now."""
        with self._locked():
            return self._free(slot)

    def usage(self) -> Usage:
        with self._locked():
            fields = _PAGE.unpack(self._page)
        return Usage(
            running=sum(fields[0::4]), memory_in_use_mb=sum(fields[1::4]), held_mb=sum(fields[3::4])
        )

    def close(self) -> None:
        self._page.close()

    # -- the page -----------------------------------------------------------------------------

    def _record(self, slot: int) -> tuple[int, int, int, int]:
        return _RECORD.unpack_from(self._page, slot * _RECORD.size)

    def _free(self, slot: int) -> tuple[int, int]:
        """(runs, MB) free for ``slot``: the budget less what runs and what others hold."""
        fields = _PAGE.unpack(self._page)
        _, _, own_held_runs, own_held_mb = fields[4 * slot : 4 * slot + 4]
        runs = self.max_concurrent - sum(fields[0::4]) - (sum(fields[2::4]) - own_held_runs)
        free_mb = self.memory_mb - sum(fields[1::4]) - (sum(fields[3::4]) - own_held_mb)
        return max(0, runs), max(0, free_mb)

    def _write(self, slot: int, running: int, reserved: int, held_runs: int, held_mb: int) -> None:
        _RECORD.pack_into(self._page, slot * _RECORD.size, running, reserved, held_runs, held_mb)

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
