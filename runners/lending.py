"""The host's idle sandboxes, lent to whichever worker takes a call: one shared board.

Each worker makes and destroys its own sandboxes (they die with it), but an idle one is the
host's: it is on this board, and any worker's call may take it. The board is a memfd the
arbiter makes before it forks (a worker on its own makes its own), one record per sandbox on
it, read and changed under one POSIX record lock (``lockf``: the kernel drops the lock of a
process that dies, so a SIGKILLed worker cannot wedge the others), like the capacity ledger.

A record says whose sandbox it is (worker slot and pid), its runtime and the function@version
whose code it holds (empty: generic), since when it is idle, its memory, and a descriptor:
what another worker needs to run in it (its socket, cgroup, ...; the runner's own JSON).
States: IDLE (any call may take it), TAKEN (a call runs in it, its taker's pid noted),
DOOMED (its owner is to destroy it: it broke, expired, or went over the host's idle bound).
A taker gets the record's generation with it and gives the sandbox back with it: a record
that was cleared and reused meanwhile (its owner died) is not touched by a stale give-back.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

RECORDS = 2048
"""Sandboxes the board has room for, idle and taken, host-wide."""
EMPTY, IDLE, TAKEN, DOOMED = 0, 1, 2, 3
STATE_NAMES = {IDLE: "idle", TAKEN: "taken", DOOMED: "doomed"}
_HEAD = struct.Struct("=BxHIIIQQ64s64s")
"""state, owner slot, owner pid, taker pid, generation, idle since (CLOCK_MONOTONIC ns),
idle memory (bytes), runtime, code key."""
DESCRIPTOR_BYTES = 1024
_RECORD_SIZE = _HEAD.size + 2 + DESCRIPTOR_BYTES
_DESCRIPTOR = struct.Struct("=H")
_TOP = struct.Struct("=I")
"""At the page's start: one past the highest record ever used. Records are taken lowest
first, so a scan (a call's take, under the lock) reads as many records as the host has
sandboxes, not the board's size."""
_BASE = 64


@dataclass(frozen=True)
class Entry:
    """One record, as read."""

    index: int
    state: int
    owner: int
    owner_pid: int
    taker_pid: int
    generation: int
    idle_since_ns: int
    memory_bytes: int
    runtime: str
    code_key: str | None
    descriptor: dict[str, Any]


@dataclass(frozen=True)
class Ticket:
    """A sandbox taken from the board: give it back with the same ticket."""

    index: int
    generation: int
    owner: int
    descriptor: dict[str, Any]


class SandboxBoard:
    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("nanogrid-sandboxes", 0)  # inherited across fork, not exec
            os.ftruncate(fd, _BASE + _RECORD_SIZE * RECORDS)
        self.fd = fd
        self._page = mmap.mmap(fd, _BASE + _RECORD_SIZE * RECORDS, mmap.MAP_SHARED)
        self._threads = threading.Lock()  # lockf does not exclude this process's own threads

    def reopened(self) -> SandboxBoard:
        """The same board with locks of this process's own (after a fork)."""
        return SandboxBoard(self.fd)

    # -- an owner's side ----------------------------------------------------------------------

    def put(self, owner: int, runtime: str, code_key: str | None, descriptor: dict[str, Any],
            memory_bytes: int = 0) -> Ticket | None:
        """Put an idle sandbox of ``owner`` on the board; None when the board is full."""
        blob = json.dumps(descriptor, separators=(",", ":")).encode()
        if len(blob) > DESCRIPTOR_BYTES:
            raise ValueError(f"sandbox descriptor of {len(blob)} bytes")
        with self._locked():
            for index in range(RECORDS):
                if self._head(index)[0] == EMPTY:
                    if index >= self._top():
                        _TOP.pack_into(self._page, 0, index + 1)
                    generation = self._head(index)[4] + 1
                    self._write(index, IDLE, owner, os.getpid(), 0, generation,
                                time.monotonic_ns(), memory_bytes, runtime, code_key or "")
                    offset = _BASE + index * _RECORD_SIZE + _HEAD.size
                    _DESCRIPTOR.pack_into(self._page, offset, len(blob))
                    self._page[offset + 2 : offset + 2 + len(blob)] = blob
                    return Ticket(index, generation, owner, descriptor)
        return None

    def withdraw(self, ticket: Ticket, *, doomed_only: bool = False) -> bool:
        """Take the owner's idle (or doomed) sandbox off the board, to destroy it: False when
        a call has it now (or the record is another one by now)."""
        with self._locked():
            head = self._head(ticket.index)
            allowed = (DOOMED,) if doomed_only else (IDLE, DOOMED)
            if head[4] != ticket.generation or head[0] not in allowed:
                return False
            self._write(ticket.index, EMPTY, 0, 0, 0, head[4], 0, 0, "", "")
            return True

    def owned(self, owner: int) -> list[Entry]:
        """The records of ``owner``'s sandboxes."""
        with self._locked():
            return [e for e in self._entries() if e.owner == owner and e.state != EMPTY]

    def clear(self, owner: int) -> int:
        """Forget ``owner``'s records: its worker is gone, and its sandboxes with it. A call
        that has one finds it gone on its own; its give-back is stale and ignored."""
        with self._locked():
            cleared = 0
            for index in range(self._top()):
                head = self._head(index)
                if head[0] != EMPTY and head[1] == owner:
                    self._write(index, EMPTY, 0, 0, 0, head[4], 0, 0, "", "")
                    cleared += 1
            return cleared

    # -- a call's side ------------------------------------------------------------------------

    def take(self, runtime: str, code_key: str, prefer: int) -> tuple[Ticket, str | None] | None:
        """An idle sandbox of ``runtime`` for ``code_key``: one that holds its code, else a
        generic one (its code key then None), most recently idle first and ``prefer``'s
        (the caller's own) among equals; None when the host has none idle."""
        wanted_runtime = _padded(runtime)
        wanted_key, generic = _padded(code_key), _padded("")
        with self._locked():
            best: tuple[tuple[bool, bool, int], int] | None = None
            for index in range(self._top()):
                head = _HEAD.unpack_from(self._page, _BASE + index * _RECORD_SIZE)
                if head[0] != IDLE or head[7] != wanted_runtime:
                    continue
                holds = head[8] == wanted_key
                if not holds and head[8] != generic:
                    continue
                rank = (holds, head[1] == prefer, head[5])
                if best is None or rank > best[0]:
                    best = (rank, index)
            if best is None:
                return None
            index = best[1]
            head = self._head(index)
            self._write(index, TAKEN, head[1], head[2], os.getpid(), head[4], head[5], head[6],
                        _text(head[7]), _text(head[8]))
            key = _text(head[8]) or None
            return Ticket(index, head[4], head[1], self._descriptor(index)), key

    def give_back(self, ticket: Ticket, code_key: str | None, *, healthy: bool,
                  memory_bytes: int | None = None) -> bool:
        """The call is over: the sandbox is idle again (holding ``code_key``), or doomed when
        it is no longer healthy. False when the record is another one by now."""
        with self._locked():
            head = self._head(ticket.index)
            if head[4] != ticket.generation or head[0] != TAKEN:
                return False
            memory = head[6] if memory_bytes is None else memory_bytes
            state = IDLE if healthy else DOOMED
            self._write(ticket.index, state, head[1], head[2], 0, head[4], time.monotonic_ns(),
                        memory, _text(head[7]), code_key or "")
            return True

    # -- the host's bound ---------------------------------------------------------------------

    def doom_beyond(self, max_idle: int, max_idle_bytes: int) -> int:
        """Doom the least recently used idle sandboxes beyond the host's bound (a count and a
        memory total; 0: no bound of that kind); returns how many."""
        with self._locked():
            idle = sorted((e for e in self._entries() if e.state == IDLE),
                          key=lambda e: e.idle_since_ns)
            count, total = len(idle), sum(e.memory_bytes for e in idle)
            doomed = 0
            for entry in idle:
                over_count = max_idle and count > max_idle
                over_bytes = max_idle_bytes and total > max_idle_bytes
                if not (over_count or over_bytes):
                    break
                self._write(entry.index, DOOMED, entry.owner, entry.owner_pid,
                            entry.taker_pid, entry.generation, entry.idle_since_ns,
                            entry.memory_bytes, entry.runtime, entry.code_key or "")
                count -= 1
                total -= entry.memory_bytes
                doomed += 1
            return doomed

    def entries(self) -> list[Entry]:
        with self._locked():
            return [e for e in self._entries() if e.state != EMPTY]

    def close(self) -> None:
        self._page.close()

    # -- the page -----------------------------------------------------------------------------

    def _top(self) -> int:
        return int(_TOP.unpack_from(self._page, 0)[0])

    def _head(self, index: int) -> tuple[Any, ...]:
        return _HEAD.unpack_from(self._page, _BASE + index * _RECORD_SIZE)

    def _descriptor(self, index: int) -> dict[str, Any]:
        offset = _BASE + index * _RECORD_SIZE + _HEAD.size
        (length,) = _DESCRIPTOR.unpack_from(self._page, offset)
        return json.loads(bytes(self._page[offset + 2 : offset + 2 + length]))

    def _entries(self) -> Iterator[Entry]:
        for index in range(self._top()):
            state, owner, pid, taker, generation, since, memory, runtime, key = self._head(index)
            if state == EMPTY:
                continue
            yield Entry(index, state, owner, pid, taker, generation, since, memory,
                        _text(runtime), _text(key) or None, self._descriptor(index))

    def _write(self, index: int, state: int, owner: int, pid: int, taker: int,
               generation: int, since: int, memory: int, runtime: str, key: str) -> None:
        _HEAD.pack_into(self._page, _BASE + index * _RECORD_SIZE, state, owner, pid, taker,
                        generation, since, memory, runtime.encode(), key.encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._threads:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _padded(text: str) -> bytes:
    """``text`` as the board stores it (a fixed field, NUL-padded)."""
    return text.encode().ljust(64, b"\0")


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode()
