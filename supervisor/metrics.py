"""The Prometheus families /metrics serves, fed from the workers' status lines by the arbiter."""

from __future__ import annotations

from common.config import MiB
from worker.result import Result, Timings

from .prometheus import Registry

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
PHASE_BUCKETS_S = (0.0005, 0.001, 0.0025, *DURATION_BUCKETS_S)
"""Phases such as fetch and unpack often take well under 5 ms."""
MEMORY_BUCKETS_BYTES = tuple(2**i * MiB for i in range(2, 13))
"""4 MiB to 4 GiB, doubling."""


class SupervisorMetrics:
    """The /metrics families, fed from the workers' status lines by the arbiter's loop."""

    def __init__(self) -> None:
        self.registry = Registry()
        reg = self.registry
        self.invocations = reg.counter(
            "nanogrid_invocations_total", "Invocations finished, by status and errorType.",
            ("status", "error_type"))
        self.cold_starts = reg.counter(
            "nanogrid_cold_starts_total", "Invocations that found no warm sandbox.")
        self.duration = reg.histogram(
            "nanogrid_invocation_duration_seconds", "Run time of the functions.",
            DURATION_BUCKETS_S)
        self.peak_memory = reg.histogram(
            "nanogrid_invocation_peak_memory_bytes", "Peak memory of each invocation.",
            MEMORY_BUCKETS_BYTES)
        self.phase_seconds = reg.histogram(
            "nanogrid_task_phase_seconds",
            "Time per phase of each task (the result's timings: queued, fetch, unpack, "
            "sandbox, run, total).", PHASE_BUCKETS_S, ("phase",))
        self.sandboxes = reg.gauge(
            "nanogrid_sandboxes", "Sandboxes by runtime and state (warm: idle and ready).",
            ("runtime", "state"))
        self.workers_alive = reg.gauge("nanogrid_workers_alive", "Workers booted and running.")
        self.capacity = {
            "memoryMb": reg.gauge("nanogrid_capacity_memory_mb",
                                  "The host's budget: sum of memoryMb that may run at once."),
            "memoryInUseMb": reg.gauge("nanogrid_capacity_memory_in_use_mb",
                                       "Sum of memoryMb of the invocations running now."),
            "running": reg.gauge("nanogrid_capacity_running", "Invocations running now."),
            "maxConcurrent": reg.gauge("nanogrid_capacity_max_concurrent",
                                       "Invocations that may run at once on this host."),
        }
        self.restarts = reg.counter(
            "nanogrid_worker_restarts_total",
            "Workers replaced after a crash, a missed heartbeat or a failed boot.")
        self.faults = reg.counter(
            "nanogrid_worker_faults_total",
            "Faults the workers reported, by kind: host (disk full, I/O error, a download cut "
            "off), dead_letter_copy (a copy the dead-letter queue refused), outbox_set_aside "
            "(a result Redis kept refusing), unexpected (a bug that ended one message), "
            "claim_lost (a running task's claim vanished or another worker took it).",
            ("kind",))
        self.deferrals = reg.counter(
            "nanogrid_function_deferrals_total",
            "Messages handed back to SQS untried because their function was at its cap "
            "across all hosts (never an attempt).",
            ("function_id",))
        self.reloads = reg.counter(
            "nanogrid_config_reloads_total", "SIGHUP reloads by result (ok, refused).",
            ("result",))

    def task_finished(self, result: Result) -> None:
        self.invocations.inc(status=result.status, error_type=result.error_type or "")
        if result.cold_start:
            self.cold_starts.inc()
        self.duration.observe(result.duration_millis / 1000)
        self.peak_memory.observe(result.peak_memory_bytes)
        if result.timings is not None:
            for phase in Timings.PHASES:
                self.phase_seconds.observe(getattr(result.timings, f"{phase}_ms") / 1000,
                                           phase=phase)

    def update(self, workers_alive: int, pools: dict[str, dict[str, int]],
               capacity: dict[str, int]) -> None:
        self.workers_alive.set(workers_alive)
        for name, gauge in self.capacity.items():
            gauge.set(capacity[name])
        self.sandboxes.replace({(runtime, state): count for runtime, stats in pools.items()
                                for state, count in stats.items()})

    def render(self) -> str:
        return self.registry.render()
