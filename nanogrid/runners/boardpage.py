"""The sandbox board's shared page (lending.py): its layout, and its records read and written.

The page starts with ``top`` (one past the highest record ever used) and the recent ring (a
count, then the last ``RECENT`` records to go idle with their generations, newest last);
the records follow, 64-byte aligned. A record is a fixed head (``_HEAD``: its fields, the
runtime and code key NUL-padded to 64 bytes) and a descriptor: a length, then up to
``DESCRIPTOR_BYTES`` of JSON. Every read and write here is under the board's lock (the
board takes it). The scans compare the padded fields raw (``padded``) and look at a
record's state and owner bytes before they unpack it: a take runs under the host's lock.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from typing import Any

RECORDS = 2048
"""Sandboxes the board has room for, idle and taken, host-wide."""
EMPTY, IDLE, TAKEN, DOOMED = 0, 1, 2, 3
"""A record's state byte (lending.py says what each means)."""
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
_MEMORY_AT = struct.calcsize("=BBHIIIQ")
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
_PAGE_SIZE = _BASE + _RECORD_SIZE * RECORDS


class BoardPage:
    """The board's memfd, mapped: the same records in every process that has its fd."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("nanogrid-sandboxes", 0)  # inherited across fork, not exec
            os.ftruncate(fd, _PAGE_SIZE)
        self.fd = fd
        self._map = mmap.mmap(fd, _PAGE_SIZE, mmap.MAP_SHARED)

    def close(self) -> None:
        self._map.close()

    def top(self) -> int:
        return int(_TOP.unpack_from(self._map, 0)[0])

    def claim(self) -> int | None:
        """Under the lock: the lowest empty record, for a new sandbox, read by the scans from
        now on (None: the board is full)."""
        index = self._states(RECORDS).find(EMPTY)
        if index < 0:
            return None
        if index >= self.top():
            _TOP.pack_into(self._map, 0, index + 1)
        return index

    def head(self, index: int) -> tuple[Any, ...]:
        return _HEAD.unpack_from(self._map, _BASE + index * _RECORD_SIZE)

    def descriptor(self, index: int) -> dict[str, Any]:
        offset = _BASE + index * _RECORD_SIZE + _HEAD.size
        (length,) = _DESCRIPTOR.unpack_from(self._map, offset)
        return dict(json.loads(bytes(self._map[offset + 2 : offset + 2 + length])))

    def set_descriptor(self, index: int, blob: bytes) -> None:
        offset = _BASE + index * _RECORD_SIZE + _HEAD.size
        _DESCRIPTOR.pack_into(self._map, offset, len(blob))
        self._map[offset + 2 : offset + 2 + len(blob)] = blob

    def went_idle(self, index: int, generation: int) -> None:
        """Under the lock: record ``index`` went idle now (the newest recent entry)."""
        (count,) = _RECENT_COUNT.unpack_from(self._map, _RECENT_AT)
        slot = _RECENT_ENTRIES_AT + (count % RECENT) * _RECENT_ENTRY.size
        _RECENT_ENTRY.pack_into(self._map, slot, index, generation)
        _RECENT_COUNT.pack_into(self._map, _RECENT_AT, (count + 1) & 0xFFFFFFFF)

    def recent_own(self, runtime: bytes, key: bytes, prefer: int) -> int | None:
        """Under the lock: the most recently idle of ``prefer``'s sandboxes holding ``key``,
        when the recent entries show it (newer than any sandbox idle outside them)."""
        (count,) = _RECENT_COUNT.unpack_from(self._map, _RECENT_AT)
        page, owner = self._map, prefer.to_bytes(2, sys.byteorder)
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

    def best(self, runtime: bytes, key: bytes, empty: bytes | None, prefer: int
             ) -> int | None:
        """Under the lock, a whole scan: the idle sandbox of ``runtime`` that holds ``key``
        (else, when ``empty`` is given, a generic one), the caller's own first, then the
        most recently idle."""
        best: tuple[tuple[bool, bool, int], int] | None = None
        for index in self.idle():
            head = _HEAD.unpack_from(self._map, _BASE + index * _RECORD_SIZE)
            if head[9] != runtime:
                continue
            holds = head[10] == key
            if holds or head[10] == empty:
                rank = (holds, head[2] == prefer, head[6])
                if best is None or rank > best[0]:
                    best = (rank, index)
        return None if best is None else best[1]

    def idle(self) -> list[int]:
        """Under the lock: the idle records (their state bytes read in one go)."""
        return [index for index, state in enumerate(self._states(self.top())) if state == IDLE]

    def idle_within(self, max_idle: int, max_idle_bytes: int) -> bool:
        """Under the lock: the host's idle sandboxes are within both bounds."""
        idle = self.idle()
        memory = sum(_U64.unpack_from(self._map, _BASE + index * _RECORD_SIZE + _MEMORY_AT)[0]
                     for index in idle)
        return len(idle) <= max_idle and memory <= max_idle_bytes

    def in_use(self, of_owner: int | None = None) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """The records in use (``of_owner``'s only, when given), each with its head."""
        states, page = self._states(self.top()), self._map
        wanted = None if of_owner is None else of_owner.to_bytes(2, sys.byteorder)
        for index, state in enumerate(states):
            offset = _BASE + index * _RECORD_SIZE
            if state == EMPTY or (wanted is not None and page[offset + 2 : offset + 4] != wanted):
                continue
            yield index, _HEAD.unpack_from(page, offset)

    def restate(self, index: int, head: tuple[Any, ...], state: int, taker: int | None = None
                ) -> None:
        """Record ``index`` (read as ``head``) in ``state``, its other fields as they were."""
        _, flags, owner, pid, old_taker, generation, since, memory, limit, runtime, key = head
        self.write(index, state, flags, owner, pid, old_taker if taker is None else taker,
                   generation, since, memory, limit, unpadded(runtime), unpadded(key))

    def clear(self, index: int, head: tuple[Any, ...]) -> None:
        self.write(index, EMPTY, 0, 0, 0, 0, head[5], 0, 0, 0, "", "")

    def write(self, index: int, state: int, flags: int, owner: int, pid: int, taker: int,
              generation: int, since: int, memory: int, limit_mb: int, runtime: str, key: str
              ) -> None:
        _HEAD.pack_into(self._map, _BASE + index * _RECORD_SIZE, state, flags, owner, pid,
                        taker, generation, since, memory, limit_mb, runtime.encode(),
                        key.encode())

    def _states(self, count: int) -> bytes:
        """The state byte of the first ``count`` records, read in one go."""
        end = _BASE + count * _RECORD_SIZE
        return self._map[_BASE:end:_RECORD_SIZE]


def descriptor_blob(descriptor: dict[str, Any]) -> bytes:
    """``descriptor`` as a record stores it (raises ValueError when it does not fit)."""
    blob = json.dumps(descriptor, separators=(",", ":")).encode()
    if len(blob) > DESCRIPTOR_BYTES:
        raise ValueError(f"sandbox descriptor of {len(blob)} bytes")
    return blob


def padded(text: str) -> bytes:
    """``text`` as the board stores it (a fixed field, NUL-padded)."""
    return text.encode().ljust(64, b"\0")


def unpadded(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode()
