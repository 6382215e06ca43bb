"""The worker -> arbiter status channel: one small JSON line per event over a pipe.

The worker side (``StatusReporter``) never blocks: a write that would block is dropped and
counted, and the count rides along with the next heartbeat. Each line is shorter than
PIPE_BUF, so the heartbeat thread and the main thread never interleave their bytes. The
arbiter side (``StatusReader``) reads what is there when its selector says so.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .result import Result

HEARTBEAT = "heartbeat"
BOOTED = "booted"
STARTED = "started"
FINISHED = "finished"
ENDED = "ended"
"""A run that ended without a result to report (its message kept for a retry)."""
FAULT = "fault"
DEFERRED = "deferred"
"""A message handed back untried: its function was at its cap across hosts."""
SLOT = "slot"
"""A run of a capped function took a slot."""

RESULT_FIELDS = (
    "requestId", "functionId", "runtime", "status", "errorType", "durationMillis",
    "peakMemoryBytes", "memoryMb", "recommendedMemoryMb", "tipCode", "coldStart", "timings",
)
"""The part of a Result the arbiter needs for /status and /metrics (a line stays < PIPE_BUF)."""
MAX_LINE = 4096
"""PIPE_BUF on Linux: a write up to this size is atomic."""


class StatusReporter:
    """Used by a worker to tell the arbiter what it is doing."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dropped = 0
        os.set_blocking(fd, False)

    def heartbeat(
        self, degraded: list[str] | None = None, counts: dict[str, int] | None = None
    ) -> None:
        """Alive; ``degraded`` is why no new work is taken (empty when all is well);
        ``counts``: the worker's running totals (Services.counts), for /metrics."""
        message: dict[str, Any] = {
            "type": HEARTBEAT, "dropped": self.dropped, "degraded": degraded or [],
        }
        if counts is not None:
            message["counts"] = counts
        self._send(message)

    def fault(self, kind: str, message: str) -> None:
        self._send({"type": FAULT, "kind": kind, "message": message})

    def booted(self) -> None:
        self._send({"type": BOOTED})

    def task_started(self, request_id: str) -> None:
        self._send({"type": STARTED, "requestId": request_id})

    def task_finished(self, result: Result) -> None:
        self._send({"type": FINISHED, "result": result.summary(*RESULT_FIELDS)})

    def task_ended(self, request_id: str) -> None:
        self._send({"type": ENDED, "requestId": request_id})

    def deferred(self, function_id: str, cap: int | None, running: int | None) -> None:
        """A message of ``function_id`` went back: the function is at ``cap`` with
        ``running`` in flight on all hosts (None: known from a moment ago)."""
        self._send({"type": DEFERRED, "functionId": function_id, "cap": cap,
                    "running": running})

    def slot(self, function_id: str, cap: int, running: int) -> None:
        self._send({"type": SLOT, "functionId": function_id, "cap": cap, "running": running})

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_LINE:
            self.dropped += 1
            return
        try:
            os.write(self.fd, line)
        except OSError:  # full (EAGAIN) or the arbiter is gone (EPIPE): never block the worker
            self.dropped += 1


class StatusReader:
    """The arbiter's end of one worker's pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.eof = False
        self._partial = b""
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[dict[str, Any]]:
        """The complete messages available now; sets ``eof`` once the worker closed its end."""
        chunks = [self._partial]
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        *lines, partial = b"".join(chunks).split(b"\n")
        self._partial = partial if len(partial) <= MAX_LINE else b""
        messages = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                messages.append(message)
        return messages

    def close(self) -> None:
        os.close(self.fd)
