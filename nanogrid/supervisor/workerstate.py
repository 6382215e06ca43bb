"""What the arbiter knows of its workers and slots, kept up to date from their status lines
and exits: heartbeats, what runs, and each slot's crash backoff."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from nanogrid.common.config import Config
from nanogrid.common.exitcodes import EXIT_BOOT_ERROR, WORKER_EXIT_NAMES
from nanogrid.worker import status
from nanogrid.worker.result import Result
from nanogrid.worker.status import StatusReader

LONG_POLL_MARGIN_S = 10.0
"""The heartbeat timeout is never shorter than a long poll plus this margin."""
CRASH_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Wait before replacing a slot's n-th crash in a row: the first is replaced at once."""
BOOT_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)
"""Wait before the n-th retry of a worker that could not boot (Redis or the queue down)."""
STABLE_AFTER_S = 10.0
"""A worker that booted and lived this long clears its slot's count of crashes in a row."""


@dataclass
class Slot:
    """Worker id k, across the processes that served as it."""

    index: int
    restarts: int = 0
    tasks_done: int = 0
    failures: int = 0
    """Crashes in a row, for the backoff."""
    not_before: float = 0.0
    """Monotonic time before which no process is forked for this slot."""

    def crashed(self, worker: WorkerProcess, code: int, now: float) -> float:
        """Count its process's unexpected exit and set the backoff; returns the wait."""
        if worker.booted and now - worker.started >= STABLE_AFTER_S:
            self.failures = 0
        self.failures += 1
        self.restarts += 1
        table = BOOT_BACKOFF_S if code == EXIT_BOOT_ERROR else CRASH_BACKOFF_S
        delay = table[min(self.failures, len(table)) - 1]
        self.not_before = now + delay
        return delay


@dataclass
class WorkerProcess:
    """One forked worker, as the arbiter knows it."""

    pid: int
    index: int
    reader: StatusReader
    started: float
    last_beat: float
    booted: bool = False
    running: dict[str, float] = field(default_factory=dict)
    """requestId -> when it started, oldest first."""
    dropped: int = 0
    degraded: list[str] = field(default_factory=list)
    """Why the worker takes no new work now (e.g. Redis cannot take results)."""
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per fault kind: how many, the last message and when (monotonic)."""
    retiring: bool = False
    """Told to drain (reload, stop): its exit is expected, not a crash."""
    kill_at: float | None = None
    """SIGTERM was sent; SIGKILL follows at this monotonic time."""
    killed: bool = False

    def apply(self, message: dict[str, Any]) -> Result | None:
        """Take in one status line; returns the result it reports as finished, if any."""
        self.last_beat = time.monotonic()
        kind = message.get("type")
        if kind == status.HEARTBEAT:
            self.dropped = int(message.get("dropped") or 0)
            reasons = message.get("degraded")
            self.degraded = [str(r) for r in reasons] if isinstance(reasons, list) else []
        elif kind == status.BOOTED:
            self.booted = True
            logger.info(f"worker {self.index} (pid {self.pid}) booted")
        elif kind == status.STARTED and isinstance(message.get("requestId"), str):
            self.running[message["requestId"]] = self.last_beat
        elif kind == status.ENDED:
            self.running.pop(str(message.get("requestId")), None)
        elif kind == status.FINISHED and isinstance(message.get("result"), dict):
            result = Result.from_dict(message["result"])
            self.running.pop(str(result.request_id), None)
            return result
        elif kind == status.FAULT:
            seen = self.faults.setdefault(str(message.get("kind")), {"count": 0})
            seen.update(count=seen["count"] + 1, message=str(message.get("message")),
                        at=time.monotonic())
        return None

    @property
    def state(self) -> str:
        if self.retiring or self.kill_at is not None:
            return "draining"
        return "running" if self.booted else "booting"


def heartbeat_timeout(config: Config) -> float:
    """Seconds of silence after which a worker is killed; covers a whole long poll."""
    return max(config.heartbeat_timeout_seconds,
               config.queue.wait_time_seconds + LONG_POLL_MARGIN_S)


def describe_exit(code: int) -> str:
    """``exited with code 3 (EXIT_BOOT_ERROR)`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    name = WORKER_EXIT_NAMES.get(code)
    return f"exited with code {code}" + (f" ({name})" if name else "")
