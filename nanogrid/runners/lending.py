"""The host's idle sandboxes, lent to whichever worker takes a call: one shared board.

Each worker makes and destroys its own sandboxes (they die with it), but an idle one is the
host's: it is on this board, and any worker's call may take it. The board is a memfd the
arbiter makes before it forks (a worker on its own makes its own), one record per sandbox on
it, read and changed under one POSIX record lock (``lockf``: the kernel drops the lock of a
process that dies, so a SIGKILLed worker cannot wedge the others), like the capacity ledger.

A record says whose sandbox it is (worker slot and pid), its runtime and the function@version
whose code it holds (empty: generic), since when it is idle, its memory then, whether it was
left frozen, and a descriptor: what another worker needs to run in it (its socket, cgroup,
...; the runner's own JSON). States: IDLE (any call may take it), TAKEN (a call runs in it,
its taker's pid noted), DOOMED (its owner is to destroy it: it broke, expired, or went over
the host's idle bound). A taker gets the record's generation with it and gives the sandbox
back with it: a record that was cleared and reused meanwhile (its owner died) is not touched
by a stale give-back.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from nanogrid.common.pagelock import PageLock

RECORDS = 2048
"""Sandboxes the board has room for, idle and taken, host-wide."""
EMPTY, IDLE, TAKEN, DOOMED = 0, 1, 2, 3
FROZEN = 1
"""A flag: the sandbox was left frozen (its next taker thaws it)."""
SHRUNK = 2
"""A flag: its server dropped what it keeps started for a call, the sandbox idle long (a
node Worker; its next call starts one). A call's give-back clears it."""
_HEAD = struct.Struct("=BBHIIIQQI64s64s")
"""state, flags, owner slot, owner pid, taker pid, generation, idle since (CLOCK_MONOTONIC
ns), idle memory (bytes), memory limit (MB, as its last call set it), runtime, code key."""
DESCRIPTOR_BYTES = 1024
_RECORD_SIZE = _HEAD.size + 2 + DESCRIPTOR_BYTES
_DESCRIPTOR = struct.Struct("=H")
_TOP = struct.Struct("=I")
"""At the page's start: one past the highest record ever used. Records are taken lowest
first, so a scan (a call's take, under the lock) reads as many records as the host has
sandboxes, not the board's size."""
_U64 = struct.Struct("=Q")
_SINCE_AT = struct.calcsize("=BBHIII")
_MEMORY_AT = _SINCE_AT + _U64.size
_RUNTIME_AT = struct.calcsize("=BBHIIIQQI")
_KEY_AT = _RUNTIME_AT + 64
RECENT = 16
"""The last sandboxes to go idle, newest last: a take looks there first. A record that
holds the call's code and is the caller's own, found there, is the one a whole scan would
pick (nothing idle since longer can rank above it), so at a host of hundreds of idle
sandboxes of one function a take reads a few records, not every one (a whole scan took
~0.4 ms at 500, under the host's lock). Few: a take that finds none there (another worker's
sandbox, a generic one) reads them all before its scan; only a board of more records than
this is looked at first."""
_RECENT_COUNT = struct.Struct("=I")
_RECENT_AT = _TOP.size
_RECENT_ENTRY = struct.Struct("=II")
"""record, its generation: stale once the record is another one (or no longer idle)."""
_RECENT_ENTRIES_AT = _RECENT_AT + _RECENT_COUNT.size
_BASE = -(-(_RECENT_ENTRIES_AT + RECENT * _RECENT_ENTRY.size) // 64) * 64


@dataclass(slots=True)
class Entry:
    """One record, as read (not frozen: a tend reads every record of the host, and a frozen
    dataclass costs ~3 us more each to make)."""

    index: int
    state: int
    frozen: bool
    owner: int
    owner_pid: int
    taker_pid: int
    generation: int
    idle_since_ns: int
    memory_bytes: int
    runtime: str
    code_key: str | None
    shrunk: bool = False

    @property
    def taker_gone(self) -> bool:
        """Taken by a process that is gone: its call died with it, the sandbox is unknown.
        (This process's own takes are not looked up: the keeper asks of every taken sandbox
        each tick, 25 us a /proc read.)"""
        return self.state == TAKEN and self.taker_pid != os.getpid() and not alive(
            self.taker_pid
        )


@dataclass(frozen=True)
class Ticket:
    """A sandbox taken from (or put on) the board: give it back with the same ticket."""

    index: int
    generation: int
    owner: int
    owner_pid: int
    descriptor: dict[str, Any]
    limit_mb: int = 0
    """The memory limit its last call set (0: none yet)."""
    frozen: bool = False

    @property
    def owner_gone(self) -> bool:
        """The sandbox's owner is gone: it died with it (a call in it failed for that)."""
        return not alive(self.owner_pid)


class SandboxBoard:
    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("nanogrid-sandboxes", 0)  # inherited across fork, not exec
            os.ftruncate(fd, _BASE + _RECORD_SIZE * RECORDS)
        self.fd = fd
        self._page = mmap.mmap(fd, _BASE + _RECORD_SIZE * RECORDS, mmap.MAP_SHARED)
        self._lock = PageLock(fd)

    def reopened(self) -> SandboxBoard:
        """The same board with locks of this process's own (after a fork)."""
        return SandboxBoard(self.fd)

    # -- an owner's side ----------------------------------------------------------------------

    def put(self, owner: int, runtime: str, code_key: str | None, descriptor: dict[str, Any],
            memory_bytes: int = 0, limit_mb: int = 0, *, taken: bool = False
            ) -> Ticket | None:
        """Put a new sandbox of ``owner`` on the board, idle or taken by this process (a call
        that made it runs in it first); None when the board is full."""
        blob = _blob(descriptor)
        with self._locked():
            index = self._states(RECORDS).find(EMPTY)
            if index < 0:
                return None
            head = self._head(index)
            if index >= self._top():
                _TOP.pack_into(self._page, 0, index + 1)
            generation = head[5] + 1
            self._write(index, TAKEN if taken else IDLE, 0, owner, os.getpid(),
                        os.getpid() if taken else 0, generation, time.monotonic_ns(),
                        memory_bytes, limit_mb, runtime, code_key or "")
            self._set_descriptor(index, blob)
            if not taken:
                self._went_idle(index, generation)
            return Ticket(index, generation, owner, os.getpid(), descriptor, limit_mb)

    def withdraw(self, entry: Entry) -> bool:
        """Take the owner's idle sandbox off the board, to destroy it: False when a call has
        it now (or the record is another one by now)."""
        with self._locked():
            head = self._head(entry.index)
            if head[5] != entry.generation or head[0] != IDLE:
                return False
            self._clear(entry.index, head)
            return True

    def hold(self, entry: Entry) -> Ticket | None:
        """Take the owner's idle sandbox off the board for upkeep (``give_back`` it with its
        ``idle_since_ns``): None when a call has it now (or the record is another one)."""
        with self._locked():
            head = self._head(entry.index)
            if head[5] != entry.generation or head[0] != IDLE:
                return None
            return self._take(entry.index, head, os.getpid())

    def doom(self, entry: Entry) -> None:
        """Mark the owner's sandbox to be destroyed (unless the record is another by now)."""
        with self._locked():
            head = self._head(entry.index)
            if head[5] == entry.generation and head[0] != EMPTY:
                self._restate(entry.index, head, DOOMED)

    def clear_doomed(self, owner: int, index: int, generation: int) -> bool:
        """Free ``owner``'s doomed record ``index`` (of ``generation``): True when it was, the
        sandbox is the owner's to destroy now."""
        with self._locked():
            head = self._head(index)
            if head[0] != DOOMED or head[2] != owner or head[5] != generation:
                return False
            self._clear(index, head)
            return True

    def owned(self, owner: int) -> list[Entry]:
        """The records of ``owner``'s sandboxes."""
        with self._locked():
            return list(self._entries(owner))

    def clear(self, owner: int) -> int:
        """Forget ``owner``'s records: its worker is gone, and its sandboxes with it. A call
        that has one finds it gone on its own; its give-back is stale and ignored."""
        with self._locked():
            cleared = 0
            for index in range(self._top()):
                head = self._head(index)
                if head[0] != EMPTY and head[2] == owner:
                    self._clear(index, head)
                    cleared += 1
            return cleared

    # -- a call's side ------------------------------------------------------------------------

    def take(self, runtime: str, code_key: str, prefer: int, *, generic: bool = True
             ) -> tuple[Ticket, str | None] | None:
        """An idle sandbox of ``runtime`` for ``code_key``: one that holds its code, else
        (``generic``) a generic one (its code key then None), most recently idle first and
        ``prefer``'s (the caller's own) among equals; None when the host has none idle."""
        wanted_runtime = _padded(runtime)
        wanted_key, empty = _padded(code_key), _padded("")
        me = os.getpid()
        with self._locked():
            while True:
                index = None
                if self._top() > RECENT:  # fewer records: a whole scan reads no more
                    index = self._recent_own(wanted_runtime, wanted_key, prefer)
                if index is None:
                    index = self._best(wanted_runtime, wanted_key, empty if generic else None,
                                       prefer)
                if index is None:
                    return None
                head = self._head(index)
                if head[3] != me and not alive(head[3]):
                    # Its owner died and took it along; the arbiter has not reaped it yet.
                    self._clear(index, head)
                    continue
                return self._take(index, head, me), _text(head[10]) or None

    def give_back(self, ticket: Ticket, code_key: str | None, *, healthy: bool,
                  frozen: bool = False, memory_bytes: int | None = None,
                  limit_mb: int | None = None, descriptor: dict[str, Any] | None = None,
                  shrunk: bool = False, idle_since_ns: int | None = None) -> bool:
        """The call is over: the sandbox is idle again (holding ``code_key``; ``frozen``:
        left frozen; ``limit_mb``: the memory limit the call set), or doomed when it is no
        longer healthy; ``descriptor``: what changed about it (its owner's). An upkeep's
        (``hold``) says ``shrunk`` and keeps its ``idle_since_ns``. False when the record is
        another one by now."""
        blob = _blob(descriptor) if descriptor is not None else None
        with self._locked():
            head = self._head(ticket.index)
            if head[5] != ticket.generation or head[0] != TAKEN:
                return False
            memory = head[7] if memory_bytes is None else memory_bytes
            limit = head[8] if limit_mb is None else limit_mb
            state = IDLE if healthy else DOOMED
            flags = (FROZEN if frozen else 0) | (SHRUNK if shrunk else 0)
            since = time.monotonic_ns() if idle_since_ns is None else idle_since_ns
            self._write(ticket.index, state, flags, head[2], head[3], 0, head[5], since,
                        memory, limit, _text(head[9]), code_key or "")
            if blob is not None:
                self._set_descriptor(ticket.index, blob)
            if healthy and idle_since_ns is None:
                self._went_idle(ticket.index, head[5])
            return True

    # -- the host's bound ---------------------------------------------------------------------

    def doom_beyond(self, max_idle: int, max_idle_bytes: int) -> int:
        """Doom the least recently used idle sandboxes that hold a function's code while the
        host has more idle than ``max_idle`` or their memory is over ``max_idle_bytes``;
        returns how many. Generic ones count but stay: they are the runtimes' ``warm``."""
        with self._locked():
            if self._idle_within(max_idle, max_idle_bytes):
                return 0
            idle = [e for e in self._entries() if e.state == IDLE]
            count, total = len(idle), sum(e.memory_bytes for e in idle)
            doomed = 0
            for entry in sorted((e for e in idle if e.code_key is not None),
                                key=lambda e: e.idle_since_ns):
                if count <= max_idle and total <= max_idle_bytes:
                    break
                self._restate(entry.index, self._head(entry.index), DOOMED)
                count -= 1
                total -= entry.memory_bytes
                doomed += 1
            return doomed

    def holds(self, ticket: Ticket) -> bool:
        """Whether this process still has the sandbox ``ticket`` took (its owner did not
        take it back, nor was its record cleared meanwhile)."""
        with self._locked():
            head = self._head(ticket.index)
            return head[0] == TAKEN and head[5] == ticket.generation and head[4] == os.getpid()

    def entries(self) -> list[Entry]:
        with self._locked():
            return list(self._entries())

    def close(self) -> None:
        self._page.close()

    # -- the page -----------------------------------------------------------------------------

    def _top(self) -> int:
        return int(_TOP.unpack_from(self._page, 0)[0])

    def _states(self, count: int) -> bytes:
        """The state byte of the first ``count`` records, read in one go."""
        end = _BASE + count * _RECORD_SIZE
        return self._page[_BASE:end:_RECORD_SIZE]

    def _went_idle(self, index: int, generation: int) -> None:
        """Under the lock: record ``index`` went idle now (the newest recent entry)."""
        (count,) = _RECENT_COUNT.unpack_from(self._page, _RECENT_AT)
        slot = _RECENT_ENTRIES_AT + (count % RECENT) * _RECENT_ENTRY.size
        _RECENT_ENTRY.pack_into(self._page, slot, index, generation)
        _RECENT_COUNT.pack_into(self._page, _RECENT_AT, (count + 1) & 0xFFFFFFFF)

    def _recent_own(self, runtime: bytes, key: bytes, prefer: int) -> int | None:
        """Under the lock: the most recently idle of ``prefer``'s sandboxes holding ``key``,
        when the recent entries show it (newer than any sandbox idle outside them)."""
        (count,) = _RECENT_COUNT.unpack_from(self._page, _RECENT_AT)
        page, owner = self._page, prefer.to_bytes(2, sys.byteorder)
        for back in range(1, min(count, RECENT) + 1):
            slot = _RECENT_ENTRIES_AT + ((count - back) % RECENT) * _RECENT_ENTRY.size
            index, generation = _RECENT_ENTRY.unpack_from(page, slot)
            offset = _BASE + index * _RECORD_SIZE
            if page[offset] != IDLE or page[offset + 2 : offset + 4] != owner:
                continue  # before the whole record's unpack: a miss reads every entry
            head = _HEAD.unpack_from(page, offset)
            if head[5] == generation and head[9] == runtime and head[10] == key:
                return index
        return None

    def _best(self, runtime: bytes, key: bytes, empty: bytes | None, prefer: int
              ) -> int | None:
        """Under the lock, a whole scan: the idle sandbox of ``runtime`` that holds ``key``
        (else, when ``empty`` is given, a generic one), the caller's own first, then the
        most recently idle."""
        best: tuple[tuple[bool, bool, int], int] | None = None
        for index in self._idle():
            head = _HEAD.unpack_from(self._page, _BASE + index * _RECORD_SIZE)
            if head[9] != runtime:
                continue
            holds = head[10] == key
            if holds or head[10] == empty:
                rank = (holds, head[2] == prefer, head[6])
                if best is None or rank > best[0]:
                    best = (rank, index)
        return None if best is None else best[1]

    def _idle(self) -> list[int]:
        """Under the lock: the idle records (their state bytes read in one go)."""
        return [index for index, state in enumerate(self._states(self._top())) if state == IDLE]

    def _head(self, index: int) -> tuple[Any, ...]:
        return _HEAD.unpack_from(self._page, _BASE + index * _RECORD_SIZE)

    def _descriptor(self, index: int) -> dict[str, Any]:
        offset = _BASE + index * _RECORD_SIZE + _HEAD.size
        (length,) = _DESCRIPTOR.unpack_from(self._page, offset)
        return dict(json.loads(bytes(self._page[offset + 2 : offset + 2 + length])))

    def _set_descriptor(self, index: int, blob: bytes) -> None:
        offset = _BASE + index * _RECORD_SIZE + _HEAD.size
        _DESCRIPTOR.pack_into(self._page, offset, len(blob))
        self._page[offset + 2 : offset + 2 + len(blob)] = blob

    def _idle_within(self, max_idle: int, max_idle_bytes: int) -> bool:
        """Under the lock: the host's idle sandboxes are within both bounds."""
        idle = self._idle()
        memory = sum(_U64.unpack_from(self._page, _BASE + index * _RECORD_SIZE + _MEMORY_AT)[0]
                     for index in idle)
        return len(idle) <= max_idle and memory <= max_idle_bytes

    def _entries(self, of_owner: int | None = None) -> Iterator[Entry]:
        """The records in use (``of_owner``'s only, when given)."""
        states, page = self._states(self._top()), self._page
        wanted = None if of_owner is None else of_owner.to_bytes(2, sys.byteorder)
        for index, state in enumerate(states):
            offset = _BASE + index * _RECORD_SIZE
            if state == EMPTY or (wanted is not None and page[offset + 2 : offset + 4] != wanted):
                continue
            state, flags, owner, pid, taker, generation, since, memory, _, runtime, key = (
                self._head(index)
            )
            yield Entry(index, state, bool(flags & FROZEN), owner, pid, taker, generation,
                        since, memory, _text(runtime), _text(key) or None,
                        shrunk=bool(flags & SHRUNK))

    def _take(self, index: int, head: tuple[Any, ...], taker: int) -> Ticket:
        """Under the lock: record ``index`` (read as ``head``) taken by ``taker``; its ticket."""
        self._restate(index, head, TAKEN, taker=taker)
        return Ticket(index, head[5], head[2], head[3], self._descriptor(index), head[8],
                      frozen=bool(head[1] & FROZEN))

    def _restate(self, index: int, head: tuple[Any, ...], state: int, taker: int | None = None
                 ) -> None:
        """Record ``index`` (read as ``head``) in ``state``, its other fields as they were."""
        _, flags, owner, pid, old_taker, generation, since, memory, limit, runtime, key = head
        self._write(index, state, flags, owner, pid, old_taker if taker is None else taker,
                    generation, since, memory, limit, _text(runtime), _text(key))

    def _clear(self, index: int, head: tuple[Any, ...]) -> None:
        self._write(index, EMPTY, 0, 0, 0, 0, head[5], 0, 0, 0, "", "")

    def _write(self, index: int, state: int, flags: int, owner: int, pid: int, taker: int,
               generation: int, since: int, memory: int, limit_mb: int, runtime: str, key: str
               ) -> None:
        _HEAD.pack_into(self._page, _BASE + index * _RECORD_SIZE, state, flags, owner, pid,
                        taker, generation, since, memory, limit_mb, runtime.encode(),
                        key.encode())

    def _locked(self) -> AbstractContextManager[None]:
        return self._lock.held()


def _blob(descriptor: dict[str, Any]) -> bytes:
    blob = json.dumps(descriptor, separators=(",", ":")).encode()
    if len(blob) > DESCRIPTOR_BYTES:
        raise ValueError(f"sandbox descriptor of {len(blob)} bytes")
    return blob


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a pid of this host): not gone, nor a zombie (a worker
    that died and is not reaped yet: its sandboxes died with it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return False
    return bool(fields) and fields[0] not in (b"Z", b"X")


def _padded(text: str) -> bytes:
    """``text`` as the board stores it (a fixed field, NUL-padded)."""
    return text.encode().ljust(64, b"\0")


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode()
