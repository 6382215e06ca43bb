"""The host's idle sandboxes, lent to whichever worker takes a call: one shared board.

Each worker makes and destroys its own sandboxes (they die with it), but an idle one is the
host's: it is on this board, and any worker's call may take it. The board is a memfd the
arbiter makes before it forks (a worker on its own makes its own), one record per sandbox on
it (boardpage.py lays them out), read and changed under one POSIX record lock (``lockf``:
the kernel drops the lock of a process that dies, so a SIGKILLed worker cannot wedge the
others), like the capacity ledger.

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

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from nanogrid.common.pagelock import PageLock

from .boardpage import (
    DOOMED,
    EMPTY,
    IDLE,
    RECENT,
    TAKEN,
    BoardPage,
    descriptor_blob,
    padded,
    unpadded,
)

FROZEN = 1
"""A flag: the sandbox was left frozen (its next taker thaws it)."""
SHRUNK = 2
"""A flag: its server dropped what it keeps started for a call, the sandbox idle long (a
node Worker; its next call starts one). A call's give-back clears it."""


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
        self._page = BoardPage(fd)
        self.fd = self._page.fd
        self._lock = PageLock(self.fd)

    def reopened(self) -> SandboxBoard:
        """The same board with locks of this process's own (after a fork)."""
        return SandboxBoard(self.fd)

    # -- an owner's side ----------------------------------------------------------------------

    def put(self, owner: int, runtime: str, code_key: str | None, descriptor: dict[str, Any],
            memory_bytes: int = 0, limit_mb: int = 0, *, taken: bool = False
            ) -> Ticket | None:
        """Put a new sandbox of ``owner`` on the board, idle or taken by this process (a call
        that made it runs in it first); None when the board is full."""
        blob = descriptor_blob(descriptor)
        page = self._page
        with self._locked():
            index = page.claim()
            if index is None:
                return None
            generation = page.head(index)[5] + 1
            page.write(index, TAKEN if taken else IDLE, 0, owner, os.getpid(),
                       os.getpid() if taken else 0, generation, time.monotonic_ns(),
                       memory_bytes, limit_mb, runtime, code_key or "")
            page.set_descriptor(index, blob)
            if not taken:
                page.went_idle(index, generation)
            return Ticket(index, generation, owner, os.getpid(), descriptor, limit_mb)

    def withdraw(self, entry: Entry) -> bool:
        """Take the owner's idle sandbox off the board, to destroy it: False when a call has
        it now (or the record is another one by now)."""
        with self._locked():
            head = self._page.head(entry.index)
            if head[5] != entry.generation or head[0] != IDLE:
                return False
            self._page.clear(entry.index, head)
            return True

    def hold(self, entry: Entry) -> Ticket | None:
        """Take the owner's idle sandbox off the board for upkeep (``give_back`` it with its
        ``idle_since_ns``): None when a call has it now (or the record is another one)."""
        with self._locked():
            head = self._page.head(entry.index)
            if head[5] != entry.generation or head[0] != IDLE:
                return None
            return self._take(entry.index, head, os.getpid())

    def doom(self, entry: Entry) -> None:
        """Mark the owner's sandbox to be destroyed (unless the record is another by now)."""
        with self._locked():
            head = self._page.head(entry.index)
            if head[5] == entry.generation and head[0] != EMPTY:
                self._page.restate(entry.index, head, DOOMED)

    def clear_doomed(self, owner: int, index: int, generation: int) -> bool:
        """Free ``owner``'s doomed record ``index`` (of ``generation``): True when it was, the
        sandbox is the owner's to destroy now."""
        with self._locked():
            head = self._page.head(index)
            if head[0] != DOOMED or head[2] != owner or head[5] != generation:
                return False
            self._page.clear(index, head)
            return True

    def owned(self, owner: int) -> list[Entry]:
        """The records of ``owner``'s sandboxes."""
        with self._locked():
            return list(self._entries(owner))

    def clear(self, owner: int) -> int:
        """Forget ``owner``'s records: its worker is gone, and its sandboxes with it. A call
        that has one finds it gone on its own; its give-back is stale and ignored."""
        page = self._page
        with self._locked():
            records = list(page.in_use(owner))
            for index, head in records:
                page.clear(index, head)
            return len(records)

    # -- a call's side ------------------------------------------------------------------------

    def take(self, runtime: str, code_key: str, prefer: int, *, generic: bool = True
             ) -> tuple[Ticket, str | None] | None:
        """An idle sandbox of ``runtime`` for ``code_key``: one that holds its code, else
        (``generic``) a generic one (its code key then None), most recently idle first and
        ``prefer``'s (the caller's own) among equals; None when the host has none idle."""
        wanted_runtime = padded(runtime)
        wanted_key, empty = padded(code_key), padded("")
        me, page = os.getpid(), self._page
        with self._locked():
            while True:
                index = None
                if page.top() > RECENT:  # fewer records: a whole scan reads no more
                    index = page.recent_own(wanted_runtime, wanted_key, prefer)
                if index is None:
                    index = page.best(wanted_runtime, wanted_key, empty if generic else None,
                                      prefer)
                if index is None:
                    return None
                head = page.head(index)
                if head[3] != me and not alive(head[3]):
                    # Its owner died and took it along; the arbiter has not reaped it yet.
                    page.clear(index, head)
                    continue
                return self._take(index, head, me), unpadded(head[10]) or None

    def give_back(self, ticket: Ticket, code_key: str | None, *, healthy: bool,
                  frozen: bool = False, memory_bytes: int | None = None,
                  limit_mb: int | None = None, descriptor: dict[str, Any] | None = None,
                  shrunk: bool = False, idle_since_ns: int | None = None) -> bool:
        """The call is over: the sandbox is idle again (holding ``code_key``; ``frozen``:
        left frozen; ``limit_mb``: the memory limit the call set), or doomed when it is no
        longer healthy; ``descriptor``: what changed about it (its owner's). An upkeep's
        (``hold``) says ``shrunk`` and keeps its ``idle_since_ns``. False when the record is
        another one by now."""
        blob = descriptor_blob(descriptor) if descriptor is not None else None
        page = self._page
        with self._locked():
            head = page.head(ticket.index)
            if head[5] != ticket.generation or head[0] != TAKEN:
                return False
            memory = head[7] if memory_bytes is None else memory_bytes
            limit = head[8] if limit_mb is None else limit_mb
            state = IDLE if healthy else DOOMED
            flags = (FROZEN if frozen else 0) | (SHRUNK if shrunk else 0)
            since = time.monotonic_ns() if idle_since_ns is None else idle_since_ns
            page.write(ticket.index, state, flags, head[2], head[3], 0, head[5], since,
                       memory, limit, unpadded(head[9]), code_key or "")
            if blob is not None:
                page.set_descriptor(ticket.index, blob)
            if healthy and idle_since_ns is None:
                page.went_idle(ticket.index, head[5])
            return True

    # -- the host's bound ---------------------------------------------------------------------

    def doom_beyond(self, max_idle: int, max_idle_bytes: int) -> int:
        """Doom the least recently used idle sandboxes that hold a function's code while the
        host has more idle than ``max_idle`` or their memory is over ``max_idle_bytes``;
        returns how many. Generic ones count but stay: they are the runtimes' ``warm``."""
        page = self._page
        with self._locked():
            if page.idle_within(max_idle, max_idle_bytes):
                return 0
            idle = [e for e in self._entries() if e.state == IDLE]
            count, total = len(idle), sum(e.memory_bytes for e in idle)
            doomed = 0
            for entry in sorted((e for e in idle if e.code_key is not None),
                                key=lambda e: e.idle_since_ns):
                if count <= max_idle and total <= max_idle_bytes:
                    break
                page.restate(entry.index, page.head(entry.index), DOOMED)
                count -= 1
                total -= entry.memory_bytes
                doomed += 1
            return doomed

    def holds(self, ticket: Ticket) -> bool:
        """Whether this process still has the sandbox ``ticket`` took (its owner did not
        take it back, nor was its record cleared meanwhile)."""
        with self._locked():
            head = self._page.head(ticket.index)
            return head[0] == TAKEN and head[5] == ticket.generation and head[4] == os.getpid()

    def entries(self) -> list[Entry]:
        with self._locked():
            return list(self._entries())

    def close(self) -> None:
        self._page.close()

    def _entries(self, of_owner: int | None = None) -> Iterator[Entry]:
        """Under the lock: the records in use (``of_owner``'s only, when given)."""
        for index, head in self._page.in_use(of_owner):
            state, flags, owner, pid, taker, generation, since, memory, _, runtime, key = head
            yield Entry(index, state, bool(flags & FROZEN), owner, pid, taker, generation,
                        since, memory, unpadded(runtime), unpadded(key) or None,
                        shrunk=bool(flags & SHRUNK))

    def _take(self, index: int, head: tuple[Any, ...], taker: int) -> Ticket:
        """Under the lock: record ``index`` (read as ``head``) taken by ``taker``; its ticket."""
        self._page.restate(index, head, TAKEN, taker=taker)
        return Ticket(index, head[5], head[2], head[3], self._page.descriptor(index), head[8],
                      frozen=bool(head[1] & FROZEN))

    def _locked(self) -> AbstractContextManager[None]:
        return self._lock.held()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a pid of this host): not gone, nor a zombie (a worker
    that died and is not reaped yet: its sandboxes died with it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return False
    return bool(fields) and fields[0] not in (b"Z", b"X")
