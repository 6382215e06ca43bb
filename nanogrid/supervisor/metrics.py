"""The Prometheus families /metrics serves, fed from the workers' status lines by the arbiter.

Base units throughout (seconds, bytes). Invocation families carry a ``runtime`` label. What
only the host knows (the outbox, the agent's processes) is read when /metrics is scraped
(hostmetrics.py), so it costs nothing between scrapes.
"""

from __future__ import annotations

from typing import Any

from nanogrid.common.config import MiB
from nanogrid.worker.faults import FAULT_KINDS
from nanogrid.worker.result import Result, Timings

from .hostmetrics import HostMetrics
from .prometheus import Registry
from .warmup import WARMING

DURATION_BUCKETS_S = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
    10, 30, 60, 300, 900,
)
"""A warm hello world runs 2-5 ms: 1 ms steps there, so its median can be read."""
PHASE_BUCKETS_S = (0.0005, *DURATION_BUCKETS_S)
"""Phases such as fetch and unpack often take well under 1 ms."""
MEMORY_BUCKETS_BYTES = tuple(2**i * MiB for i in range(2, 13))
"""4 MiB to 4 GiB, doubling."""
CAPACITY_GAUGES = {
    "memoryMb": ("nanogrid_capacity_memory_bytes", MiB,
                 "The host's budget: sum of memory that may run at once."),
    "memoryInUseMb": ("nanogrid_capacity_memory_in_use_bytes", MiB,
                      "Sum of the memory of the invocations running now."),
    "heldMb": ("nanogrid_capacity_memory_held_bytes", MiB,
               "Memory held for messages being received or waiting to start."),
    "running": ("nanogrid_capacity_running", 1, "Invocations running now."),
    "maxConcurrent": ("nanogrid_capacity_max_concurrent", 1,
                      "Invocations that may run at once on this host."),
}
"""/status ``capacity`` key -> (metric, factor to base units, help)."""
SANDBOX_STATES = {"idleGeneric": "idle_generic", "idleSpecialized": "idle_specialized",
                  "busy": "busy"}
"""/status ``pools`` count -> ``state`` label of nanogrid_sandboxes (disjoint: they sum)."""
DEPENDENCIES = {"sqs": "sqs", "s3": "s3", "redis": "redis", "cloudwatch": "cloudwatch"}
"""Worker count name -> ``dependency`` label of nanogrid_dependency_errors_total."""


class SupervisorMetrics:
    """The /metrics families, fed from the workers' status lines by the arbiter's loop."""

    def __init__(self) -> None:
        self.registry = Registry()
        reg = self.registry
        self.invocations = reg.counter(
            "nanogrid_invocations_total", "Invocations finished, by runtime, status and errorType.",
            ("runtime", "status", "error_type"))
        self.starts = reg.counter(
            "nanogrid_invocation_starts_total",
            "Invocations that ran, by runtime and start: cold (no warm sandbox was ready) or "
            "warm.", ("runtime", "start"))
        self.duration = reg.histogram(
            "nanogrid_invocation_duration_seconds", "Run time of the functions.",
            DURATION_BUCKETS_S, ("runtime",))
        self.peak_memory = reg.histogram(
            "nanogrid_invocation_peak_memory_bytes", "Peak memory of each invocation.",
            MEMORY_BUCKETS_BYTES, ("runtime",))
        self.phase_seconds = reg.histogram(
            "nanogrid_task_phase_seconds",
            "Time per phase of each task (the result's timings: queued, fetch, unpack, "
            "sandbox, run, total).", PHASE_BUCKETS_S, ("phase",))
        self.tips = reg.counter(
            "nanogrid_tips_total", "Auto-tuner tips given, by runtime and tipCode.",
            ("runtime", "tip_code"))
        self.allocated = reg.counter(
            "nanogrid_memory_allocated_byte_seconds_total",
            "Memory set times run time of the invocations that ran (what is billed).",
            ("runtime",))
        self.savable = reg.counter(
            "nanogrid_tip_savable_byte_seconds_total",
            "Of the allocated byte-seconds, what the OVER_PROVISIONED tips' settings would "
            "have saved.", ("runtime",))
        self.sandboxes = reg.gauge(
            "nanogrid_sandboxes", "The host's sandboxes by runtime and state: idle_generic "
            "(ready for any function), idle_specialized (holding a function's code), busy.",
            ("runtime", "state"))
        self.sandboxes_lent = reg.gauge(
            "nanogrid_sandboxes_lent", "Busy sandboxes a worker other than their owner runs "
            "a call in.", ("runtime",))
        self.sandboxes_shrunk = reg.gauge(
            "nanogrid_sandboxes_shrunk", "Idle node sandboxes that ended the Worker they kept "
            "for their next call (pool.node_worker_idle_seconds).", ("runtime",))
        self.idle_memory = reg.gauge(
            "nanogrid_sandboxes_idle_memory_bytes", "Memory of the host's idle sandboxes.")
        self.idle_bound = reg.gauge(
            "nanogrid_sandboxes_idle_memory_max_bytes", "The host's bound on it "
            "(pool.max_idle_mb).")
        self.warming = reg.gauge(
            "nanogrid_warming", "1 while the pools warm up after a start or a reload.")
        self.workers_alive = reg.gauge("nanogrid_workers_alive", "Workers booted and running.")
        self.workers_configured = reg.gauge(
            "nanogrid_workers_configured", "Workers the config asks for.")
        self.degraded = reg.gauge(
            "nanogrid_degraded", "1 while /health says DEGRADED: a live worker takes no new "
            "work because a dependency fails.")
        self.workers_degraded = reg.gauge(
            "nanogrid_workers_degraded", "Live workers taking no new work (a dependency fails).")
        self.capacity = {
            key: (reg.gauge(name, help_text), factor)
            for key, (name, factor, help_text) in CAPACITY_GAUGES.items()
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
        for kind in FAULT_KINDS:  # every series there from the start: rules see a 0, not none
            self.faults.inc(0, kind=kind)
        self.dependency_errors = reg.counter(
            "nanogrid_dependency_errors_total",
            "Calls to a peer that failed (after the client's own retries), by dependency: "
            "sqs, s3 (not a missing object), redis, cloudwatch.", ("dependency",))
        for label in DEPENDENCIES.values():
            self.dependency_errors.inc(0, dependency=label)
        self.dead_lettered = reg.counter(
            "nanogrid_dead_lettered_total", "Messages copied to the dead-letter queue.")
        self.resent = reg.counter(
            "nanogrid_messages_resent_total",
            "Messages handed back untried that were sent again as new messages, so the task "
            "queue's redrive policy would not dead-letter them (never an attempt).")
        self.deferrals = reg.counter(
            "nanogrid_function_deferrals_total",
            "Messages handed back to SQS untried because their function was at its cap "
            "across all hosts (never an attempt).",
            ("function_id",))
        self.reloads = reg.counter(
            "nanogrid_config_reloads_total", "SIGHUP reloads by result (ok, refused).",
            ("result",))
        self.host = HostMetrics(reg)
        self._counts: dict[int, dict[str, int]] = {}
        """Per worker pid, the running totals it last reported (deltas become increments)."""

    def task_finished(self, result: Result) -> None:
        runtime = result.runtime or ""
        self.invocations.inc(runtime=runtime, status=result.status,
                             error_type=result.error_type or "")
        ran = result.recommended_memory_mb is not None  # results of runs carry a tip
        if ran:
            self.starts.inc(runtime=runtime, start="cold" if result.cold_start else "warm")
            self.duration.observe(result.duration_millis / 1000, runtime=runtime)
            self.peak_memory.observe(result.peak_memory_bytes, runtime=runtime)
            self._tip(result, runtime)
        if result.timings is not None:
            for phase in Timings.PHASES:
                self.phase_seconds.observe(getattr(result.timings, f"{phase}_ms") / 1000,
                                           phase=phase)

    def _tip(self, result: Result, runtime: str) -> None:
        if result.tip_code is not None:
            self.tips.inc(runtime=runtime, tip_code=result.tip_code)
        if not result.memory_mb:
            return
        seconds = result.duration_millis / 1000
        self.allocated.inc(result.memory_mb * MiB * seconds, runtime=runtime)
        recommended = result.recommended_memory_mb or result.memory_mb
        if result.tip_code == "OVER_PROVISIONED" and recommended < result.memory_mb:
            self.savable.inc((result.memory_mb - recommended) * MiB * seconds, runtime=runtime)

    def worker_counts(self, pid: int, counts: Any) -> None:
        """A worker's running totals (Services.counts): what grew since its last report."""
        if not isinstance(counts, dict):
            return
        last = self._counts.setdefault(pid, {})
        for name, value in counts.items():
            if not isinstance(value, int) or value <= last.get(name, 0):
                continue
            grown, last[name] = value - last.get(name, 0), value
            if name in DEPENDENCIES:
                self.dependency_errors.inc(grown, dependency=DEPENDENCIES[name])
            elif name == "deadLettered":
                self.dead_lettered.inc(grown)
            elif name == "resent":
                self.resent.inc(grown)

    def worker_gone(self, pid: int) -> None:
        self._counts.pop(pid, None)

    def update(self, status: dict[str, Any]) -> None:
        """The gauges, from the /status snapshot of this turn."""
        alive = [w for w in status["workers"] if w["alive"]]
        self.workers_alive.set(len(alive))
        self.workers_configured.set(status["workersConfigured"])
        degraded = sum(1 for w in alive if w.get("degraded"))
        self.workers_degraded.set(degraded)
        self.degraded.set(1 if degraded and not status["stopping"] else 0)
        for key, (gauge, factor) in self.capacity.items():
            gauge.set(status["capacity"].get(key, 0) * factor)
        self.sandboxes.replace({(runtime, state): stats[key]
                                for runtime, stats in status["pools"].items()
                                for key, state in SANDBOX_STATES.items()})
        self.sandboxes_lent.replace({(runtime,): stats["lent"]
                                     for runtime, stats in status["pools"].items()})
        self.sandboxes_shrunk.replace({(runtime,): stats["shrunk"]
                                       for runtime, stats in status["pools"].items()})
        self.idle_memory.set(status["sandboxes"]["idleMb"] * MiB)
        self.idle_bound.set(status["sandboxes"]["maxIdleMb"] * MiB)
        self.warming.set(1 if status["warmUp"]["state"] == WARMING else 0)

    def render(self) -> str:
        return self.registry.render()
