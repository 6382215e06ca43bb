"""What /status says, built each turn of the arbiter's loop from its slots, workers, the
capacity ledger and the host checks (health.py serves it, /health derives from it)."""

from __future__ import annotations

from typing import Any

from common.config import Config
from common.version import VERSION
from worker.ledger import Ledger

from .workerstate import Slot, WorkerProcess


def build(config: Config, slots: dict[int, Slot], workers: dict[int, WorkerProcess],
          ledger: Ledger, *, pid: int, isolation: dict[str, Any],
          runtimes: dict[str, dict[str, Any]], caps: dict[str, dict[str, int]],
          stopping: bool, uptime: float, now: float) -> dict[str, Any]:
    """The whole /status document."""
    by_slot = {w.index: w for w in workers.values()}
    return {
        "version": VERSION,
        "pid": pid,
        "workers": [worker_status(slot, by_slot.get(slot.index), now)
                    for slot in sorted(slots.values(), key=lambda s: s.index)],
        "workersConfigured": config.workers,
        "runner": config.runner,
        "pools": pool_totals(list(workers.values())),
        "capacity": capacity_status(ledger),
        "concurrency": {"defaultCap": config.concurrency.default_cap, "functions": caps},
        "isolation": isolation,
        "runtimes": runtimes,
        "restartsTotal": sum(s.restarts for s in slots.values()),
        "stopping": stopping,
        "uptimeSeconds": round(uptime, 1),
        "configPath": config.path,
        "configLoadedAt": config.loaded_at,
    }


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
