"""What the agent's sides of every sandbox server's protocol share (forkclient.py,
nodeclient.py): the protocol a runner calls (``SandboxClient``), what a run produced before
the runner reads it (``RawRun``), output kept within its cap, and the connection."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nanogrid.common.errors import SandboxError

from .base import RunOutcome

MAX_REPLY = 1 << 20
"""The largest reply a server sends (a run's status and what it preloaded)."""


@dataclass
class RawRun:
    """What one run produced, as its server reported it, before the runner interprets it."""

    status: int
    timed_out: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float
    maxrss_bytes: int
    preload: dict | None = None
    """What the node server preloaded and left out, when that changed (the fork server says
    it after the run: ``SandboxClient.preloaded``)."""

    def outcome(self, *, exit_code: int | None, oom_killed: bool, peak: int,
                source: str) -> RunOutcome:
        """This run as the worker sees it, with the runner's verdict and measurement."""
        return RunOutcome(
            exit_code=exit_code,
            timed_out=self.timed_out,
            oom_killed=oom_killed,
            stdout=self.stdout,
            stderr=self.stderr,
            stdout_truncated=self.stdout_truncated,
            stderr_truncated=self.stderr_truncated,
            duration_ms=self.duration_ms,
            peak_memory_bytes=peak,
            peak_source=source,
        )


class Capped:
    """A byte buffer that keeps the first ``limit`` bytes and notes whether more came."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


def connect(path: str, kind: int, timeout_s: float, server: str) -> socket.socket:
    """A connection to a sandbox's server socket, waiting up to ``timeout_s`` for it."""
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                sock.close()
                raise SandboxError(f"sandbox {server} did not come up: {exc}") from None
            time.sleep(0.002)


class SandboxClient(Protocol):
    """The agent's side of a sandbox's server: one run at a time over one socket."""

    @property
    def ready_at_reply(self) -> bool:
        """The server waits for the next call once the run's reply is in; else it says so
        later (a node server's 'W' frame, a fork server's account of its preload; see
        nanogrid/runners/freezer.py)."""
        ...

    @property
    def busy_until_ready(self) -> bool:
        """The server takes no call until it says it is ready (a fork server preloading):
        its sandbox settles before it goes back, frozen or not. A node server queues the next
        call behind the Worker it readies."""
        ...

    preloaded: dict | None
    """What the fork server said it preloaded and left out after the last run, once taken."""

    def run(
        self,
        *,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        python: bool,
        stdin: bytes,
        timeout_s: float,
        max_output_bytes: int,
        rlimits: dict[str, int] | None = None,
        preload: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> RawRun:
        """One function run to its end (or its timeout); SandboxError when the server broke.
        ``preload``: the sandbox's code_key, when the server may preload its function's
        imports; ``on_sent``: called once the request is sent."""
        ...

    def arm(self) -> None:
        """After the run's peak was read: the server may get the next call ready."""
        ...

    def shrink(self, timeout_s: float) -> bool:
        """Between runs, its sandbox idle long: the server drops what it keeps started for
        the next call (a node server's Worker). False when it did not say it did within
        ``timeout_s``."""
        ...

    def fileno(self) -> int: ...

    def take_ready(self) -> bool:
        """Once the socket is readable after ``arm``: take the server's word that it is
        ready. False when the server broke meanwhile."""
        ...

    def close(self) -> None: ...
