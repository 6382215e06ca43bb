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
same free room from SQS at once. Holds are honoured oldest first: a worker admitting what it
holds counts only the holds older than its own, so two workers that each wait for room the
other holds (a large task behind a small one's hold) cannot wait for each other forever.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

from nanogrid.common.pagelock import PageLock

SLOTS = 256
"""Workers the page has room for (``workers`` is at most 256)."""
_RECORD = struct.Struct("=IIIIQ")
"""running, reserved_mb, held_runs, held_mb, held_since (CLOCK_MONOTONIC ns, one clock for
every process of the host; 0 while nothing is held)."""
_FIELDS = 5
_PAGE = struct.Struct("=" + "IIIIQ" * SLOTS)


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
        self._lock = PageLock(self.fd)

    def resize(self, memory_mb: int, max_concurrent: int) -> Ledger:
        """The same page under a new budget (a reload): running tasks stay counted."""
        return Ledger(memory_mb, max_concurrent, self.fd)

    def admit(self, slot: int, memory_mb: int) -> bool:
        """Reserve ``memory_mb`` for one more run of worker ``slot`` if the budget has room,
        leaving what other workers hold."""
        with self._locked():
            running, reserved, held_runs, held_mb, since = self._record(slot)
            runs, free_mb = self._free(slot, own_hold=True)
            fits = runs >= 1 and memory_mb <= free_mb
            if fits:
                self._write(slot, running + 1, reserved + memory_mb, held_runs, held_mb, since)
            return fits

    def hold_for_receive(self, slot: int, typical_mb: int, smallest_mb: int, most: int) -> int:
        """How many messages worker ``slot`` may receive now (at most ``most``), counting each
        as ``typical_mb``; that room is held for it until ``hold`` changes it."""
        with self._locked():
            runs, free_mb = self._free(slot)
            wanted = 0 if runs == 0 or free_mb < smallest_mb else max(
                1, min(most, runs, free_mb // typical_mb)
            )
            running, reserved, *_ = self._record(slot)
            self._write(
                slot, running, reserved, wanted, min(free_mb, wanted * typical_mb),
                time.monotonic_ns() if wanted else 0,
            )
            return wanted

    def hold(self, slot: int, runs: int, memory_mb: int) -> None:
        """What worker ``slot`` holds now: a task that waits for room (1, its memory), or
        nothing (0, 0). A hold keeps its age while it lasts (from the receive it follows)."""
        with self._locked():
            running, reserved, held_runs, _, since = self._record(slot)
            if not runs:
                since = 0
            elif not (held_runs and since):
                since = time.monotonic_ns()
            self._write(slot, running, reserved, runs, memory_mb, since)

    def release(self, slot: int, memory_mb: int) -> None:
        """One run of worker ``slot`` ended."""
        with self._locked():
            running, reserved, held_runs, held_mb, since = self._record(slot)
            self._write(
                slot, max(0, running - 1), max(0, reserved - memory_mb), held_runs, held_mb, since
            )

    def reset(self, slot: int) -> None:
        """Forget what slot ``slot`` held: its worker is gone (or a new one starts there)."""
        with self._locked():
            self._write(slot, 0, 0, 0, 0, 0)

    def room(self, slot: int) -> tuple[int, int]:
        """(runs, MB) the host could still start for worker ``slot`` now."""
        with self._locked():
            return self._free(slot)

    def usage(self) -> Usage:
        with self._locked():
            fields = _PAGE.unpack(self._page)
        return Usage(
            running=sum(fields[0::_FIELDS]),
            memory_in_use_mb=sum(fields[1::_FIELDS]),
            held_mb=sum(fields[3::_FIELDS]),
        )

    def close(self) -> None:
        self._page.close()

    # -- the page -----------------------------------------------------------------------------

    def _record(self, slot: int) -> tuple[int, int, int, int, int]:
        return _RECORD.unpack_from(self._page, slot * _RECORD.size)

    def _free(self, slot: int, own_hold: bool = False) -> tuple[int, int]:
        """(runs, MB) free for ``slot``: the budget less what runs and what others hold; with
        ``own_hold`` (admitting what ``slot`` holds) only the holds older than its own."""
        fields = _PAGE.unpack(self._page)
        base = _FIELDS * slot
        held_runs = sum(fields[2::_FIELDS]) - fields[base + 2]
        held_mb = sum(fields[3::_FIELDS]) - fields[base + 3]
        own = fields[base + 4] if own_hold and fields[base + 2] else 0
        if own:  # leave out the holds younger than this one: they wait behind it
            for other, since in enumerate(fields[4::_FIELDS]):
                if since and other != slot and (since, other) > (own, slot):
                    held_runs -= fields[_FIELDS * other + 2]
                    held_mb -= fields[_FIELDS * other + 3]
        runs = self.max_concurrent - sum(fields[0::_FIELDS]) - held_runs
        free_mb = self.memory_mb - sum(fields[1::_FIELDS]) - held_mb
        return max(0, runs), max(0, free_mb)

    def _write(
        self, slot: int, running: int, reserved: int, held_runs: int, held_mb: int, since: int
    ) -> None:
        _RECORD.pack_into(
            self._page, slot * _RECORD.size, running, reserved, held_runs, held_mb, since
        )

    def _locked(self) -> AbstractContextManager[None]:
        return self._lock.held()
