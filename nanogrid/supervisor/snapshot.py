"""What /status says, built each turn of the arbiter's loop from its slots, workers, what the
workers share (the capacity ledger, the board of sandboxes) and the host checks (health.py
serves it, /health derives from it)."""

from __future__ import annotations

from typing import Any

from nanogrid.common.config import Config, MiB
from nanogrid.common.version import VERSION
from nanogrid.runners.lending import IDLE, TAKEN, Entry
from nanogrid.worker.ledger import Ledger

from .workerstate import Slot, WorkerProcess

SANDBOX_COUNTS = ("warm", "busy", "idleGeneric", "idleSpecialized", "lent", "shrunk")


def build(config: Config, slots: dict[int, Slot], workers: dict[int, WorkerProcess],
          ledger: Ledger, sandboxes: list[Entry], *, pid: int, isolation: dict[str, Any],
          runtimes: dict[str, dict[str, Any]], caps: dict[str, dict[str, int]],
          warm_up: dict[str, Any], stopping: bool, uptime: float, now: float
          ) -> dict[str, Any]:
    """The whole /status document."""
    by_slot = {w.index: w for w in workers.values()}
    pools, host = sandbox_status(sandboxes, config)
    return {
        "version": VERSION,
        "pid": pid,
        "workers": [worker_status(slot, by_slot.get(slot.index), now)
                    for slot in sorted(slots.values(), key=lambda s: s.index)],
        "workersConfigured": config.workers,
        "runner": config.runner,
        "pools": pools,
        "sandboxes": host,
        "warmUp": warm_up,
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


def sandbox_status(entries: list[Entry], config: Config
                   ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """/status ``pools`` (per runtime) and ``sandboxes`` (the host's), from the board: idle
    (``warm``) as generic and specialized (holding a function's code), ``busy`` (a call
    runs in it), ``lent`` (of those, run by a worker other than its owner), ``shrunk`` (idle
    ones whose server ended the Worker it kept for the next call), and the idle ones' memory
    against the host's idle bound."""
    pools = {runtime: dict.fromkeys(SANDBOX_COUNTS, 0) for runtime in config.runtimes}
    idle_bytes = 0
    for entry in entries:
        counts = pools.setdefault(entry.runtime, dict.fromkeys(SANDBOX_COUNTS, 0))
        if entry.state == IDLE:
            counts["warm"] += 1
            counts["idleSpecialized" if entry.code_key else "idleGeneric"] += 1
            counts["shrunk"] += entry.shrunk
            idle_bytes += entry.memory_bytes
        elif entry.state == TAKEN:
            counts["busy"] += 1
            counts["lent"] += entry.taker_pid != entry.owner_pid
    host = {name: sum(counts[name] for counts in pools.values()) for name in SANDBOX_COUNTS}
    host.update(idleMb=round(idle_bytes / MiB), maxIdle=config.pool.max_idle,
                maxIdleMb=config.pool.max_idle_mb)
    return pools, host


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
