"""What the arbiter knows of its workers, kept up to date from their status lines, and the
per-worker part of the /status snapshot built from it."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from common.config import Config
from common.exitcodes import WORKER_EXIT_NAMES
from worker import status
from worker.ledger import Ledger
from worker.result import Result
from worker.status import StatusReader

LONG_POLL_MARGIN_S = 10.0
"""The heartbeat timeout is never shorter than a long poll plus this margin."""


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
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
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
        elif kind == status.POOLS and isinstance(message.get("pools"), dict):
            self.pools = message["pools"]
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


def worker_status(slot: Slot, worker: WorkerProcess | None, now: float) -> dict[str, Any]:
    """One entry of /status ``workers``: the slot, and the process serving it if any."""
    return {
        "id": slot.index,
        "pid": worker.pid if worker else None,
        "alive": worker is not None and worker.booted,
        "state": worker.state if worker else "waiting",
        "restarts": slot.restarts,
        "tasksDone": slot.tasks_done,
        "running": len(worker.running) if worker else 0,
        "currentRequestIds": list(worker.running) if worker else [],
        "currentRequestId": next(iter(worker.running), None) if worker else None,
        "lastHeartbeatSecondsAgo": round(now - worker.last_beat, 1) if worker else None,
        "statusMessagesDropped": worker.dropped if worker else 0,
        "degraded": list(worker.degraded) if worker else [],
        "faults": {
            kind: {"count": seen["count"], "last": seen["message"],
                   "secondsAgo": round(now - seen["at"], 1)}
            for kind, seen in (worker.faults.items() if worker else ())
        },
    }


def pool_totals(workers: list[WorkerProcess]) -> dict[str, dict[str, int]]:
    """Per runtime, the sum of every worker's ``warm`` and ``busy`` sandboxes."""
    pools: dict[str, dict[str, int]] = {}
    for worker in workers:
        for runtime, stats in worker.pools.items():
            total = pools.setdefault(runtime, {"warm": 0, "busy": 0})
            for state in total:
                total[state] += int(stats.get(state, 0))
    return pools


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


def capacity_status(ledger: Ledger) -> dict[str, int]:
    """/status ``capacity``: the host's budget and what its workers have running now."""
    usage = ledger.usage()
    return {
        "memoryMb": ledger.memory_mb,
        "memoryInUseMb": usage.memory_in_use_mb,
        "running": usage.running,
        "maxConcurrent": ledger.max_concurrent,
        "heldMb": usage.held_mb,
    }
