"""The pipeline bench's measurements (``Sample``, ``Report``) and the report printed of them."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

from pipeline_consumers import BEFORE, MULTI


@dataclass
class Sample:
    request_id: str
    start: float
    sent: float
    end: float
    duration_ms: float
    timings: dict[str, float] = field(default_factory=dict)
    """The result's own ``timings`` (the agent's; empty for the other systems)."""

    @property
    def e2e_ms(self) -> float:
        return (self.end - self.start) * 1000

    @property
    def overhead_ms(self) -> float:
        return self.e2e_ms - self.duration_ms


@dataclass
class Report:
    system: str
    samples: list[Sample] = field(default_factory=list)
    tasks: int = 0
    seconds: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU time spent during the throughput rounds, by process."""

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0

    @property
    def cores_busy(self) -> float:
        """CPU seconds per second over the throughput rounds, every process counted."""
        return sum(self.cpu_seconds.values()) / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_task(self) -> dict[str, float]:
        return {k: v * 1000 / self.tasks for k, v in self.cpu_seconds.items()} if self.tasks else {}


def stats(values: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean)."""
    if not values:
        return (float("nan"),) * 3
    p99 = (
        statistics.quantiles(values, n=100, method="inclusive")[98]
        if len(values) > 1
        else values[0]
    )
    return statistics.median(values), p99, statistics.fmean(values)


def breakdown(report: Report) -> list[tuple[str, list[float]]]:
    """Where an agent invocation's end-to-end time goes (sequential runs), in ms."""
    by_id = {r["requestId"]: r for r in report.trace}
    rows: dict[str, list[float]] = {}

    def add(label: str, seconds: float) -> None:
        rows.setdefault(label, []).append(seconds * 1000)

    for s in report.samples:
        record = by_id.get(s.request_id)
        if record is None:
            continue
        spans: dict[str, tuple[float, float]] = {}
        for label, start, end in record["spans"]:
            spans.setdefault(label, (start, end))
        if "run" not in spans or "publish" not in spans:
            continue
        received = record["receive"][1]
        handle_start, handle_end = record["handle"]
        run, publish = spans["run"], spans["publish"]

        def part(*labels: str, spans: dict[str, tuple[float, float]] = spans) -> None:
            for label in labels:
                if label in spans:
                    add(f"  of which {label}", spans[label][1] - spans[label][0])

        add("client: send_message round trip", s.sent - s.start)
        add("send starts -> worker's receive_message returns", received - s.start)
        add("receive returned -> handle starts", handle_start - received)
        add("handle starts -> run starts", run[0] - handle_start)
        part("redis_get", "claim", "code_fetch", "acquire", "extract")
        add("runner.run", run[1] - run[0])
        add("  of which durationMillis (fork -> exit)", s.duration_ms / 1000)
        add("run ends -> publish starts", publish[0] - run[1])
        part("release")
        add("publish (one script: SET, PUBLISH, claim, peak)", publish[1] - publish[0])
        add("publish returns -> client has the result", s.end - publish[1])
        add("after publish (not in e2e): delete, metrics, logs", handle_end - publish[1])
        part("sqs_delete", "metrics")
    return list(rows.items())


def service_times(report: Report) -> tuple[float, float]:
    """Median receive and handle time per task in the throughput run, in ms."""
    records = [r for r in report.trace if "-tp" in (r["requestId"] or "")]
    receive = [(r["receive"][1] - r["receive"][0]) * 1000 for r in records]
    handle = [(r["handle"][1] - r["handle"][0]) * 1000 for r in records]
    return (
        statistics.median(receive) if receive else 0.0,
        statistics.median(handle) if handle else 0.0,
    )


def phase_table(report: Report) -> list[str]:
    """The agent's own account of each sequential invocation: its result's ``timings``."""
    timed = [s.timings for s in report.samples]
    rows = [(name, [t[f"{name}Ms"] for t in timed]) for name in (
        "queued", "fetch", "unpack", "sandbox", "run", "total")]
    rows.append(("agent overhead (totalMs - runMs)", [t["totalMs"] - t["runMs"] for t in timed]))
    lines = [
        f"agent, from its results' timings ({len(timed)} sequential warm invocations):",
        "",
        "| phase | p50 | p99 |",
        "|---|---:|---:|",
    ]
    for name, values in rows:
        p50, p99, _ = stats(values)
        lines.append(f"| {name} | {p50:.3f} | {p99:.3f} |")
    return lines


def render(
    reports: dict[str, Report],
    args: argparse.Namespace,
    python: str,
    load: tuple[float, float],
    batch: int,
) -> str:
    """The report: ``load`` is the load average before and after, ``batch`` the messages per
    send_message_batch of the throughput run."""
    lines = [
        f"machine: nproc={os.cpu_count()}, kernel {platform.release()}, "
        f"python {platform.python_version()} (bench, agent), functions on {python} "
        f"({_version(python)}); load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after",
        f"sequential: {args.invocations} invocations after {args.warmup} warm-up, "
        f"{args.gap_ms:g} ms apart; throughput: {args.tasks} tasks in {args.rounds} rounds, "
        f"at most {args.window} in flight, sent with send_message_batch of "
        f"{batch}; the systems take turns",
        "",
        "| system | e2e p50 | e2e p99 | e2e mean | run p50 | overhead p50 | overhead p99 "
        "| overhead mean | tasks/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, report in reports.items():
        if not report.samples:
            lines.append(f"| {name} | | | | | | | | {report.tasks_per_s:.1f} |")
            continue
        e2e = stats([s.e2e_ms for s in report.samples])
        run = stats([s.duration_ms for s in report.samples])
        over = stats([s.overhead_ms for s in report.samples])
        lines.append(
            f"| {name} | {e2e[0]:.1f} | {e2e[1]:.1f} | {e2e[2]:.1f} | {run[0]:.1f} "
            f"| {over[0]:.1f} | {over[1]:.1f} | {over[2]:.1f} | {report.tasks_per_s:.1f} |"
        )
    lines += [
        "",
        "times in ms; e2e = send_message starts -> result arrives by pub/sub; "
        "run = the result's durationMillis; overhead = e2e - run",
    ]
    agent, baseline = reports.get("agent"), reports.get("baseline")
    if agent and agent.samples and agent.samples[0].timings:
        lines += ["", *phase_table(agent)]
    before = reports.get(BEFORE)
    if agent and before and agent.samples and before.samples:
        a, b = stats([s.e2e_ms for s in agent.samples]), stats([s.e2e_ms for s in before.samples])
        lines.append(
            f"agent vs agent-before ({args.before}): e2e p50 {a[0] - b[0]:+.2f} ms, "
            f"p99 {a[1] - b[1]:+.2f} ms, mean {a[2] - b[2]:+.2f} ms; throughput "
            f"{agent.tasks_per_s / before.tasks_per_s:.2f}x"
        )
    if agent and baseline:
        a, b = stats([s.e2e_ms for s in agent.samples]), stats([s.e2e_ms for s in baseline.samples])
        lines.append(
            f"agent vs baseline: e2e {b[0] / a[0]:.2f}x faster at p50, {b[1] / a[1]:.2f}x at p99, "
            f"{b[2] / a[2]:.2f}x in the mean; "
            f"throughput {agent.tasks_per_s / baseline.tasks_per_s:.2f}x"
        )
    cores = os.cpu_count() or 1
    for kind in MULTI:
        one, two = reports.get(f"{kind}-1w"), reports.get(f"{kind}-2w")
        if one and two and one.tasks_per_s:
            busy = one.cores_busy
            lines.append(
                f"{kind}: 2 workers {two.tasks_per_s / one.tasks_per_s:.2f}x the throughput of "
                f"1 worker; 1 worker already keeps {busy:.2f} of the {cores} cores busy "
                f"(everything counted), so no 2 workers can beat {cores / busy:.2f}x here"
            )
    supervised, bare = reports.get("supervisor-2w"), reports.get("bare-2w")
    if supervised and bare and bare.tasks_per_s:
        ratio = supervised.tasks_per_s / bare.tasks_per_s
        lines.append(
            f"supervisor's own cost: supervisor-2w {ratio:.2f}x the throughput of bare-2w "
            "(the same workers without the supervisor)"
        )
    lines += [
        "",
        "throughput run, CPU ms per task (user + system):",
        "",
        "| system | consumer process | its descendants (sandboxes, workers) | moto_server "
        "| redis-server | bench client | total | cores busy | tasks/s if CPU-bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, report in reports.items():
        cpu = report.cpu_ms_per_task
        total = sum(cpu.values())
        bound = (os.cpu_count() or 1) * 1000 / total if total else 0.0
        moto = cpu.get("moto_server", 0) + cpu.get("moto_server children", 0)
        lines.append(
            f"| {name} | {cpu.get('consumer', 0):.2f} | {cpu.get('consumer children', 0):.2f} "
            f"| {moto:.2f} | {cpu.get('redis-server', 0):.2f} | {cpu.get('bench', 0):.2f} "
            f"| {total:.2f} | {report.cores_busy:.2f} | {bound:.0f} |"
        )
    if agent and agent.trace:
        lines += [
            "",
            "agent, sequential runs: where the time goes (ms)",
            "",
            "| stage | p50 | p99 | mean |",
            "|---|---:|---:|---:|",
        ]
        for label, values in breakdown(agent):
            p50, p99, mean = stats(values)
            lines.append(f"| {label} | {p50:.2f} | {p99:.2f} | {mean:.2f} |")
        receive, handle = service_times(agent)
        lines += [
            "",
            f"agent, throughput run: median receive_message {receive:.2f} ms, "
            f"median handle {handle:.2f} ms per task",
        ]
    return "\n".join(lines)


def _version(python: str) -> str:
    try:
        out = subprocess.run([python, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
